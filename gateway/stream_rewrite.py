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

Event ids (when the stream is resumable: ``request_id`` given): every event gets
``id: <request id>:<N>`` where N counts the tokens the client has once it has the event; an event
that carries no token (the end chunk, usage, an error, ``[DONE]``) gets ``<request id>:<N>.<k>``,
the k-th such event since the N-th token. The role chunk is ``<request id>:0``.

A client's reconnect (:class:`ResumePoint`) starts a rewriter that is already *resumed*: the stream
continues on a replica from the first ``num_known`` of the client's tokens (those in the stream
state); the replica regenerates the rest up to the client's last event (greedy or seeded: the same
tokens), and those events are dropped here, so the client gets exactly the events after the one it
named.
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


@dataclass(frozen=True)
class EventId:
    """A parsed ``Last-Event-ID``: the client has ``num_tokens`` tokens and ``num_tail`` token-less
    events after the last of them."""

    request_id: str
    num_tokens: int
    num_tail: int = 0

    @classmethod
    def parse(cls, value: str, max_tokens: int) -> "EventId":
        """Raises ValueError for anything but ``<request id>:<N>`` or ``<request id>:<N>.<k>``."""
        rid, sep, pos = value.strip().rpartition(":")
        n, dot, k = pos.partition(".")
        if not sep or not rid or not n.isdigit() or (dot and not k.isdigit()) or len(n) > 9 or len(k) > 4:
            raise ValueError(f"not an event id of this gateway: {value[:80]!r}")
        if int(n) > max_tokens:
            raise ValueError("event id beyond any stream")
        return cls(rid, int(n), int(k) if dot else 0)


@dataclass(frozen=True)
class ResumePoint:
    """Where a client's reconnect continues: its last event, the tokens known for it, the original
    chunk fields."""

    last: EventId
    known_token_ids: list[int]  # the stream state's tokens, at most ``last.num_tokens`` of them
    stream_id: str | None
    created: int | None
    model: str | None


@dataclass
class RewrittenBatch:
    """One batch's result. At most one of ``done``, ``end_error`` and ``failure`` is set."""

    data: bytes  # what to write to the client now (may be empty)
    done: bool = False  # the replica sent [DONE] (already in ``data``)
    end_error: UnbrokenError | None = None  # the stream ends with this error event (already in ``data``)
    failure: UnbrokenError | None = None  # the replica failed mid-stream: ``data`` is what came before


class StreamRewriter:
    """One client stream's rewriting state across the replicas that serve it."""

    def __init__(self, first_obj: dict[str, Any], *, transferable: bool, request_id: str | None = None,
                 resume: ResumePoint | None = None) -> None:
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
        self._id_prefix = f"id: {request_id}:".encode() if request_id is not None else None
        self._num_tail = 0  # token-less events since the last token
        self._skip_to: EventId | None = None
        if resume is not None:  # a client's reconnect: its stream is already open
            self.orig_id, self.orig_created, self.orig_model = resume.stream_id, resume.created, resume.model
            self.sent_ids = list(resume.known_token_ids)
            self._num_upstreams = 1
            self._skip_to = resume.last
            self._skip_tail = 0

    def _event(self, payload: bytes, num_ids: int) -> bytes:
        """``payload`` as an SSE event, with its id when the stream is resumable."""
        if self._id_prefix is None:
            return b"data: " + payload + b"\n\n"
        if num_ids:  # (a join: about twice as fast as %-formatting, on every event of every stream)
            self._num_tail = 0
            return b"".join((self._id_prefix, str(len(self.sent_ids)).encode(), b"\ndata: ", payload, b"\n\n"))
        self._num_tail += 1
        return b"%s%d.%d\ndata: %s\n\n" % (self._id_prefix, len(self.sent_ids), self._num_tail, payload)

    def tag(self, event: bytes) -> bytes:
        """A whole ``data:`` event made elsewhere (an error, [DONE]) given its id."""
        if self._id_prefix is None:
            return event
        self._num_tail += 1
        return b"%s%d.%d\n%s" % (self._id_prefix, len(self.sent_ids), self._num_tail, event)

    def done_event(self) -> bytes:
        return self.tag(DONE_EVENT)

    def _skipping(self, num_ids: int) -> bool:
        """While a reconnect catches up to the client's last event: whether this event is one the
        client already has (its tokens are recorded either way)."""
        target = self._skip_to
        assert target is not None
        have = len(self.sent_ids)
        if have < target.num_tokens:
            if have + num_ids <= target.num_tokens:
                return True
            # The replica chunked differently from the first run (rare): the event is sent whole.
            self._skip_to = None
            return False
        if num_ids == 0 and self._skip_tail < target.num_tail:
            self._skip_tail += 1
            self._num_tail += 1
            return True
        self._skip_to = None
        return False

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
        if self._id_prefix is None:
            return b"".join(sse_event(p) for p in opening)
        return b"".join(b"%s0\ndata: %s\n\n" % (self._id_prefix, p) for p in opening)

    def rewrite(self, batch: list[bytes], *, replica_id: str, num_failovers: int) -> RewrittenBatch:
        """The bytes to send for ``batch`` (payloads of one read, from ``replica_id``)."""
        out: list[bytes] = []
        for p in batch:
            if p == DONE:
                out.append(self.done_event())
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
                out.append(self.tag(sse_error_event(err)))
                return RewrittenBatch(b"".join(out), end_error=err)
            ids = _token_ids(obj)
            if self._skip_to is not None and self._skipping(len(ids)):
                self.sent_ids.extend(ids)
                if any(ch.get("finish_reason") for ch in obj.get("choices") or ()):
                    self.finish_seen = True
                continue
            if self._rewrite_chunk(obj, ids, replica_id, num_failovers):
                p = orjson.dumps(obj)
            out.append(self._event(p, len(ids)))
        return RewrittenBatch(b"".join(out))

    def _rewrite_chunk(self, obj: dict[str, Any], ids: list[int], replica_id: str, num_failovers: int) -> bool:
        """Record ``obj``'s token ids and rewrite it in place; True if it changed."""
        changed = self.resumed
        self.sent_ids.extend(ids)
        choices = obj.get("choices")
        if choices:
            for ch in choices:
                if not isinstance(ch, dict):
                    continue
                if ch.get("index", 0) == 0:
                    delta = ch.get("delta")
                    text = ch.get("text") if "text" in ch else (delta.get("content") if isinstance(delta, dict)
                                                                else None)
                    if isinstance(text, str) and text:
                        self.sent_text.append(text)
                        self.num_content_chunks += 1
                        if not ids:
                            self.ids_complete = False
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


def _token_ids(obj: dict[str, Any]) -> list[int]:
    """The token ids of choice 0 in a chunk (empty when it carries none)."""
    for ch in obj.get("choices") or ():
        if isinstance(ch, dict) and ch.get("index", 0) == 0:
            ids = ch.get("token_ids")
            return ids if isinstance(ids, list) else []
    return []
