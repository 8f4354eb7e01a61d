"""The replica's seam to KV replication: what the engine needs, typed once.

The replica depends on :class:`Replication` only; kvsync's client
(:class:`kvsync.client.KVSyncClient`) implements it. So imports flow one way: kvsync and the
replica both import this contract, the replica never reaches into kvsync's internals, and kvsync
never imports the replica. Only the replica's entry point (``replica/__main__.py``) names the
implementation it plugs in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from unbroken.contract.kv import KVIdentity, KVSnapshot


@dataclass
class FetchResult:
    """A session's newest replicated state, as fetched for a restore."""

    snapshot: KVSnapshot | None
    outcome: str  # "restored" | "missing" | "mismatch" | "corrupt" | "timeout" | "error"
    transcript: list[dict[str, Any]] | None = None


class Replication(Protocol):
    """Publishes sessions' KV snapshots and fetches them back (on another replica, after a failover)."""

    block_tokens: int  # snapshots start at a multiple of this many tokens
    max_snapshot_bytes: int | None  # the largest snapshot the store keeps (None: unknown)

    def publish(self, snapshot: KVSnapshot) -> bool:
        """Queue ``snapshot`` without blocking; False when it was dropped (the queue is full)."""
        ...

    def too_large(self, session_id: str) -> bool:
        """Whether the session has outgrown what the store keeps: it is not exported any more."""
        ...

    def needs_full(self, session_id: str) -> bool:
        """Whether the next snapshot of the session must start at token 0 (the store lost its base)."""
        ...

    async def fetch(self, session_id: str, identity: KVIdentity, timeout_s: float) -> FetchResult:
        """The session's newest snapshot for ``identity`` (never raises for a miss or a mismatch)."""
        ...

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (within ``timeout_s``) and stop; called once at shutdown."""
        ...
