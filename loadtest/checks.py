"""What a load-test user checks in every answer, as pure functions over bytes and dicts.

A stream must be valid SSE (``data:`` events, one JSON chunk each, one id, ending in
``data: [DONE]``), carry no error event, end with exactly one ``finish_reason``, and its
``token_ids`` must account for every token: as many as asked for when ``ignore_eos`` is set,
equal to ``usage.completion_tokens`` when usage is sent, and equal to the greedy (or seeded)
reference when one is known. A mismatch is classified so the report can say what went wrong:
tokens repeated, tokens missing, different tokens, or a conversation that lost its context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import orjson


class ResponseCheckError(Exception):
    """The answer broke the contract; ``kind`` is the failure's label in reports."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclass
class Completion:
    """What one answer delivered, stream or not."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    completion_id: str | None = None
    usage: dict[str, Any] | None = None
    failovers: int = 0
    num_chunks: int = 0
    chunk_times_s: list[float] = field(default_factory=list)
    """Arrival time of each chunk that carried tokens (monotonic seconds)."""

    @property
    def cached_tokens(self) -> int:
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or 0)


class SSEParser:
    """Incremental SSE parser: feed it lines, get the ``data:`` payloads."""

    def __init__(self) -> None:
        self.done = False
        self._data: list[str] = []

    def feed_line(self, line: str) -> str | None:
        """Feed one line (without its newline); returns a complete event's data, if one ended."""
        if line.endswith("\r"):
            line = line[:-1]
        if line == "":
            if not self._data:
                return None
            data = "\n".join(self._data)
            self._data = []
            return data
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name not in ("event", "id", "retry"):
            raise ResponseCheckError("sse_invalid", f"not an SSE line: {line[:80]!r}")
        return None

    def finish(self) -> str | None:
        """End of the byte stream: a pending event without its blank line is still returned."""
        if self._data:
            data = "\n".join(self._data)
            self._data = []
            return data
        return None


class StreamAccumulator:
    """Checks each chunk of a chat (or text) completion stream as it arrives."""

    def __init__(self) -> None:
        self.completion = Completion()
        self.finished = False  # saw [DONE]

    def add_event(self, data: str, now_s: float) -> None:
        c = self.completion
        if self.finished:
            raise ResponseCheckError("sse_invalid", "data after [DONE]")
        if data == "[DONE]":
            self.finished = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ResponseCheckError("sse_invalid", f"event is not JSON: {data[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise ResponseCheckError("sse_invalid", "event is not a JSON object")
        if "error" in chunk:
            err = chunk["error"] if isinstance(chunk["error"], dict) else {}
            raise ResponseCheckError("sse_error_event",
                                     f"{err.get('code') or err.get('type')}: {err.get('message')}")
        cid = chunk.get("id")
        if c.completion_id is None:
            c.completion_id = cid
        elif cid != c.completion_id:
            raise ResponseCheckError("sse_invalid", f"chunk id changed from {c.completion_id} to {cid}")
        c.num_chunks += 1
        if chunk.get("usage"):
            c.usage = chunk["usage"]
        extra = chunk.get("unbroken")
        if isinstance(extra, dict) and "failovers" in extra:
            c.failovers = int(extra["failovers"] or 0)
        for choice in chunk.get("choices") or []:
            if c.finish_reason is not None:
                raise ResponseCheckError("sse_invalid", "a choice after finish_reason")
            delta = choice.get("delta")
            text = (delta or {}).get("content") if delta is not None else choice.get("text")
            ids = choice.get("token_ids") or []
            if text and not ids:
                raise ResponseCheckError("token_ids_missing", f"content {text[:20]!r} without token_ids")
            if ids:
                c.token_ids.extend(int(t) for t in ids)
                c.chunk_times_s.append(now_s)
            c.text += text or ""
            if choice.get("finish_reason"):
                c.finish_reason = choice["finish_reason"]

    def close(self) -> Completion:
        """The stream ended: it must have finished properly."""
        if self.completion.finish_reason is None:
            raise ResponseCheckError("stream_incomplete", "stream ended without a finish_reason")
        if not self.finished:
            raise ResponseCheckError("stream_incomplete", "stream ended without data: [DONE]")
        return self.completion


def parse_stream(lines: Iterable[str], clock=None) -> Completion:  # type: ignore[no-untyped-def]
    """Parse and check a whole SSE body given as lines (tests and simple clients)."""
    import time

    clock = clock or time.monotonic
    parser, acc = SSEParser(), StreamAccumulator()
    for line in lines:
        data = parser.feed_line(line)
        if data is not None:
            acc.add_event(data, clock())
    tail = parser.finish()
    if tail is not None:
        acc.add_event(tail, clock())
    return acc.close()


def parse_completion(body: dict[str, Any]) -> Completion:
    """Check a non-streamed chat (or text) completion."""
    if "error" in body:
        raise ResponseCheckError("error_body", str(body["error"]))
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        raise ResponseCheckError("bad_body", "expected exactly one choice")
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")
    ids = choice.get("token_ids")
    if ids is None:
        raise ResponseCheckError("token_ids_missing", "choice without token_ids")
    if not choice.get("finish_reason"):
        raise ResponseCheckError("bad_body", "choice without finish_reason")
    usage = body.get("usage")
    extra = body.get("unbroken") if isinstance(body.get("unbroken"), dict) else {}
    return Completion(token_ids=[int(t) for t in ids], text=text or "", finish_reason=choice["finish_reason"],
                      completion_id=body.get("id"), usage=usage, failovers=int(extra.get("failovers") or 0),
                      num_chunks=1)


def check_completion(c: Completion, *, max_tokens: int, ignore_eos: bool,
                     reference: list[int] | None = None, reference_text: str | None = None,
                     in_session_turn: int = 0) -> None:
    """Every token accounted for: count, usage, and equality with the reference when known."""
    n = len(c.token_ids)
    if c.usage is not None and "completion_tokens" in c.usage and c.usage["completion_tokens"] != n:
        kind = "tokens_repeated" if n > c.usage["completion_tokens"] else "tokens_missing"
        raise ResponseCheckError(kind, f"{n} token ids but usage.completion_tokens="
                                       f"{c.usage['completion_tokens']}")
    if n > max_tokens:
        raise ResponseCheckError("tokens_repeated", f"{n} tokens for max_tokens={max_tokens}")
    if ignore_eos and n != max_tokens:
        raise ResponseCheckError("tokens_missing", f"{n} tokens for max_tokens={max_tokens} with ignore_eos")
    if c.finish_reason == "length" and n != max_tokens:
        raise ResponseCheckError("tokens_missing", f"finish_reason=length after {n} of {max_tokens} tokens")
    if reference is not None and c.token_ids != reference:
        raise ResponseCheckError(classify_mismatch(c.token_ids, reference, in_session_turn),
                                 f"tokens differ from the reference at position "
                                 f"{_first_difference(c.token_ids, reference)} ({n} vs {len(reference)} tokens)")
    if reference_text is not None and c.text != reference_text:
        raise ResponseCheckError("text_mismatch", f"text {c.text[:40]!r} differs from the reference "
                                                  f"{reference_text[:40]!r} though the token ids agree")


def _first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def classify_mismatch(got: list[int], ref: list[int], in_session_turn: int = 0) -> str:
    """Name what went wrong between delivered tokens and the reference."""
    if len(got) > len(ref):
        return "tokens_repeated"
    if len(got) < len(ref):
        return "tokens_missing"
    i = _first_difference(got, ref)
    if in_session_turn > 0 and i == 0:
        return "context_lost"
    return "token_mismatch"
