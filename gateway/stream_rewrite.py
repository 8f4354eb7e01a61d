"""What the client receives of a replica's SSE stream, rewritten so that a failover cannot be seen.

:class:`StreamRewriter` is pure: it takes the ``data:`` payloads one replica sent and returns the
bytes to write, recording the ``token_ids`` of choice 0 as they pass. No sockets, no clock, no
metrics; the relay (``relay.py``) does the I/O and decides whether to fail over.

After a failover (a *resumed* stream):
- the new replica's opening events (its role chunk) are dropped: the client already has one;
- every rewritten chunk carries the first replica's ``id``, ``created`` and ``model``;
- the usage chunk counts every token the client received (the new replica only counted its own),
  for requests whose state moved (``transferable``);
- the final chunk and the usage chunk carry ``unbroken: {failovers, replica_id}`` (and, after a
  text-mode resume, ``resume: "text", exact: false``).

It also keeps what a text-mode resume needs (the answer's text so far and its chunk count), and a
payload that is not a JSON object (a malformed event) is a failure of the replica, never an
exception in the middle of the client's open response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.backends.errors import engine_error, is_error_event
from unbroken.errors import UnbrokenError, UpstreamError
from unbroken.http import sse_error_event

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


def sse_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


@dataclass
class RewrittenBatch:
    """One batch's result. At most one of ``done``, ``end_error`` and ``failure`` is set."""

    data: bytes  # what to write to the client now (may be empty)
    done: bool = False  # the replica sent [DONE] (already in ``data``)
    end_error: UnbrokenError | None = None  # the stream ends with this error event (already in ``data``)
    failure: UnbrokenError | None = None  # the replica failed mid-stream: ``data`` is what came before


class StreamRewriter:
    """One client stream's rewriting state across the replicas that serve it."""

    def __init__(self, first_obj: dict[str, Any], *, transferable: bool) -> None:
        self.orig_id = first_obj.get("id")
        self.orig_created = first_obj.get("created")
        self.orig_model = first_obj.get("model")
        self.transferable = transferable
        self.sent_ids: list[int] = []  # token ids of choice 0 that reached the client
        self.sent_text: list[str] = []  # text of choice 0 that reached the client
        self.num_content_chunks = 0  # chunks of choice 0 with text (one token each from the engines)
        self.ids_complete = True  # every such chunk carried its token_ids: an exact resume is possible
        self.finish_seen = False  # a finish_reason was relayed: only [DONE] may still be missing
        self.resumed = False
        self.num_prompt_tokens = 0  # from the usage event, when the stream carries one
        self.resume_mode = ""  # "token" | "text" once resumed
        self.num_tokens_before_text_resume = 0
        self._num_upstreams = 0

    @property
    def num_tokens_sent(self) -> int:
        return len(self.sent_ids) if self.ids_complete else self.num_content_chunks

    @property
    def text_so_far(self) -> str:
        return "".join(self.sent_text)

    def note_resume(self, mode: str) -> None:
        """The next upstream continues this stream in ``mode`` ("token" or "text")."""
        if mode == "text":  # its chunks carry no ids to trust: count tokens by chunk from here on
            self.num_tokens_before_text_resume = self.num_tokens_sent
            self.ids_complete = False
            self.resume_mode = "text"
        elif self.resume_mode != "text":
            self.resume_mode = "token"

    def begin_upstream(self, opening: list[bytes]) -> bytes:
        """A replica's stream opens with ``opening`` (the events before its first content event,
        i.e. the role chunk): relayed for the first replica, dropped for every later one."""
        self._num_upstreams += 1
        if self._num_upstreams > 1:
            self.resumed = True
            return b""
        return b"".join(sse_event(p) for p in opening)

    def rewrite(self, batch: list[bytes], *, replica_id: str, num_failovers: int) -> RewrittenBatch:
        """The bytes to send for ``batch`` (payloads of one read, from ``replica_id``)."""
        out: list[bytes] = []
        for p in batch:
            if p == DONE:
                out.append(DONE_EVENT)
                return RewrittenBatch(b"".join(out), done=True)
            try:
                obj = orjson.loads(p)
            except orjson.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                return RewrittenBatch(b"".join(out), failure=UpstreamError(
                    f"replica {replica_id} sent a malformed event: {p[:80]!r}"))
            if is_error_event(obj):
                err = engine_error(None, obj)
                if err.blames_replica:
                    return RewrittenBatch(b"".join(out), failure=err)
                out.append(sse_error_event(err))
                return RewrittenBatch(b"".join(out), end_error=err)
            if self._rewrite_chunk(obj, replica_id, num_failovers):
                p = orjson.dumps(obj)
            out.append(sse_event(p))
        return RewrittenBatch(b"".join(out))

    def _rewrite_chunk(self, obj: dict[str, Any], replica_id: str, num_failovers: int) -> bool:
        """Record ``obj``'s token ids and rewrite it in place; True if it changed."""
        changed = self.resumed
        choices = obj.get("choices")
        if choices:
            for ch in choices:
                if not isinstance(ch, dict):
                    continue
                if ch.get("index", 0) == 0:
                    ids = ch.get("token_ids")
                    delta = ch.get("delta")
                    text = ch.get("text") if "text" in ch else (delta.get("content") if isinstance(delta, dict)
                                                                else None)
                    if isinstance(text, str) and text:
                        self.sent_text.append(text)
                        self.num_content_chunks += 1
                        if not ids:
                            self.ids_complete = False
                    if ids:
                        self.sent_ids.extend(ids)
                if ch.get("finish_reason"):
                    self.finish_seen = True
                    changed = True
                    obj["unbroken"] = self._stamp(num_failovers, replica_id)
        elif obj.get("usage") is not None:
            changed = True
            usage = obj["usage"]
            if isinstance(usage, dict):
                self.num_prompt_tokens = int(usage.get("prompt_tokens") or 0)
            if self.resumed and self.transferable and isinstance(usage, dict):
                if self.resume_mode == "text":  # the new replica counted its own tokens and our prefix
                    before = self.num_tokens_before_text_resume
                    usage["completion_tokens"] = before + int(usage.get("completion_tokens") or 0)
                    usage["prompt_tokens"] = max(0, int(usage.get("prompt_tokens") or 0) - before)
                else:
                    usage["completion_tokens"] = len(self.sent_ids)
                usage["total_tokens"] = int(usage.get("prompt_tokens") or 0) + int(usage["completion_tokens"])
            obj["unbroken"] = self._stamp(num_failovers, replica_id)
        if changed and self.resumed:
            obj["id"], obj["created"], obj["model"] = self.orig_id, self.orig_created, self.orig_model
        return changed

    def _stamp(self, num_failovers: int, replica_id: str) -> dict[str, Any]:
        stamp: dict[str, Any] = {"failovers": num_failovers, "replica_id": replica_id}
        if self.resume_mode == "text":
            stamp["resume"] = "text"
            stamp["exact"] = False
        return stamp
