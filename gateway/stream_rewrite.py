"""What the client receives of a replica's SSE stream, rewritten so that a failover cannot be seen.

:class:`StreamRewriter` is pure: it takes the ``data:`` payloads one replica sent and returns the
bytes to write, recording the ``token_ids`` of choice 0 as they pass. No sockets, no clock, no
metrics; the relay (``relay.py``) does the I/O and decides whether to fail over.

After a failover (a *resumed* stream):
- the new replica's opening events (its role chunk) are dropped: the client already has one;
- every rewritten chunk carries the first replica's ``id``, ``created`` and ``model``;
- the usage chunk counts every token the client received (the new replica only counted its own),
  for requests whose state moved (``transferable``);
- the final chunk and the usage chunk carry ``unbroken: {failovers, replica_id}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from unbroken.errors import UnbrokenError, error_from_event
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
        self.finish_seen = False  # a finish_reason was relayed: only [DONE] may still be missing
        self.resumed = False
        self._num_upstreams = 0

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
            obj = orjson.loads(p)
            if "error" in obj:
                err = error_from_event(obj)
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
                if ch.get("index", 0) == 0:
                    ids = ch.get("token_ids")
                    if ids:
                        self.sent_ids.extend(ids)
                if ch.get("finish_reason"):
                    self.finish_seen = True
                    changed = True
                    obj["unbroken"] = {"failovers": num_failovers, "replica_id": replica_id}
        elif obj.get("usage") is not None:
            changed = True
            if self.resumed and self.transferable:
                usage = obj["usage"]
                usage["completion_tokens"] = len(self.sent_ids)
                usage["total_tokens"] = int(usage.get("prompt_tokens") or 0) + len(self.sent_ids)
            obj["unbroken"] = {"failovers": num_failovers, "replica_id": replica_id}
        if changed and self.resumed:
            obj["id"], obj["created"], obj["model"] = self.orig_id, self.orig_created, self.orig_model
        return changed
