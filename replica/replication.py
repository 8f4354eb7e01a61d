"""Session replication on the replica's side: which KV to export, when, and from which token.

:class:`SessionReplicator` is driven by the engine on the engine thread. It publishes a session's
kept KV after each turn and, during long generations, every ``kvsync.snapshot_every_tokens``
tokens; a snapshot carries only the blocks the store does not hold yet (``published_tokens``),
unless the store asks for a full one. It talks to the store only through the contract's
:class:`~unbroken.contract.replication.Replication` (kvsync's client implements it).
"""

from __future__ import annotations

from typing import Any, Callable

from replica.config import KVSyncSection
from replica.protocol import KVIdentity, KVSnapshot
from replica.runner import ModelRunner, SessionKV
from unbroken.contract.replication import Replication


class SessionReplicator:
    def __init__(self, replication: Replication, config: KVSyncSection,
                 identity: Callable[[str | None], KVIdentity]) -> None:
        self.replication = replication
        self.config = config  # read live: the entry point may adopt the sidecar's block size
        self.identity = identity
        self.published_tokens: dict[str, int] = {}  # session -> tokens replicated (block-aligned)
        self._marks: dict[str, int] = {}  # request -> tokens at its last snapshot
        self.num_published = 0
        self.num_dropped = 0

    def forget_request(self, request_id: str) -> None:
        self._marks.pop(request_id, None)

    def on_prefix_reused(self, session_id: str, num_cached_tokens: int) -> None:
        """A sequence reused ``num_cached_tokens`` of the session: the replicated copy is only a
        prefix of it up to there."""
        self.published_tokens[session_id] = min(self.published_tokens.get(session_id, 0), num_cached_tokens)

    def on_imported(self, session_id: str, num_tokens: int) -> None:
        """What the store holds is what was imported: the next snapshot only sends newer blocks."""
        block = self.config.block_tokens
        self.published_tokens[session_id] = num_tokens // block * block

    def after_turn(self, session_id: str, kept: SessionKV, transcript: list[dict[str, Any]]) -> None:
        """Replicate a session's kept KV, with its conversation, at the end of a turn."""
        if self.replication.too_large(session_id):
            return  # the store cannot keep it: its KV is not even copied out
        start = self._start(session_id, len(kept.token_ids))
        self._publish(KVSnapshot(
            session_id=session_id,
            identity=self.identity(kept.adapter),
            token_ids=list(kept.token_ids),
            keys=[k[:, start:].to("cpu", copy=True) for k in kept.keys],
            values=[v[:, start:].to("cpu", copy=True) for v in kept.values],
            start=start,
            transcript=transcript,
        ))

    def after_step(self, runner: ModelRunner) -> None:
        """During long generations, replicate each session's KV every N tokens."""
        every = self.config.snapshot_every_tokens
        if every <= 0:
            return
        for seq in runner.rows:
            sid = seq.request.session_id
            if sid is None or self.replication.too_large(sid):
                continue
            mark = self._marks.get(seq.request_id, 0)
            if len(seq.output_ids) - mark < every:
                continue
            self._marks[seq.request_id] = len(seq.output_ids)
            start = self._start(sid, len(seq.token_ids))
            row = runner.row_kv(seq.request_id, start)
            if row is None:
                continue
            keys, values, n = row
            self._publish(KVSnapshot(
                session_id=sid, identity=self.identity(seq.request.adapter),
                token_ids=list(seq.token_ids[:n]), keys=keys, values=values, start=start,
                transcript=None,
            ))

    def _start(self, session_id: str, num_tokens: int) -> int:
        if self.replication.needs_full(session_id):
            return 0
        block = self.config.block_tokens
        done = self.published_tokens.get(session_id, 0)
        return min(done, num_tokens) // block * block

    def _publish(self, snapshot: KVSnapshot) -> None:
        if self.replication.publish(snapshot):
            block = self.config.block_tokens
            self.published_tokens[snapshot.session_id] = len(snapshot.token_ids) // block * block
            self.num_published += 1
        else:
            self.num_dropped += 1
