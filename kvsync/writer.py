"""The replication writer: accepts snapshots from the replica at once, writes them to Redis later.

One asyncio task owns the pending state; :meth:`ReplicationWriter.accept` (called by the HTTP
handler on the same loop) only mutates it between awaits, so there are no locks.

- Coalescing: a session has at most one pending write. A newer snapshot of the same session
  replaces it, keeping the older one's not-yet-written blocks that the newer one builds on.
- Incremental snapshots (``start > 0``) build on the chain of blocks this sidecar last accepted
  (or restored) for the session. Without it (restarted sidecar, evicted session, another
  identity) the snapshot is refused with ``need_full`` (HTTP 409) and the replica sends one
  from token 0 next time.
- Redis down or slow: writes are retried with exponential backoff (one log line when replication
  pauses, one when it resumes); snapshots keep being accepted and coalesced in memory up to
  ``writer.max_pending_bytes``, past which they are refused ``busy`` (HTTP 503).
- A write that finds its base blocks gone from Redis (restarted, evicted) is abandoned and the
  session's chain forgotten, so the next snapshot must be full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from kvsync.blocks import Block, snapshot_dtype, split_blocks
from kvsync.config import KVSyncConfig
from kvsync.metrics import KVSyncMetrics
from kvsync.protocol import BlockRef, Manifest, PublishReply, decode_snapshot
from kvsync.store import KVStore
from unbroken.aio import stop_tasks
from unbroken.contract.kv import KVIdentity, KVSnapshot

log = logging.getLogger(__name__)

REDIS_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


@dataclass
class Chain:
    """What this sidecar believes a session's replicated state is (or will be, once written)."""

    identity: KVIdentity
    token_ids: list[int]
    blocks: list[BlockRef]
    transcript: list[dict[str, Any]] | None


@dataclass
class PendingWrite:
    manifest: Manifest
    blocks: dict[str, Block]  # blocks not yet known to be in Redis
    accepted_at_s: float  # monotonic time the oldest snapshot it stands for was accepted
    uploaded: set[str] = field(default_factory=set)

    @property
    def num_bytes(self) -> int:
        return sum(len(b.data) for b in self.blocks.values())


class ReplicationWriter:
    def __init__(self, store: KVStore, config: KVSyncConfig, metrics: KVSyncMetrics) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.block_tokens = config.store.block_tokens
        self.chains: OrderedDict[str, Chain] = OrderedDict()
        self.pending: OrderedDict[str, PendingWrite] = OrderedDict()
        self.committed_tokens: dict[str, int] = {}
        self.paused = False
        self.num_failures = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._backoff = ExponentialWithJitterBackoff(
            cap=config.redis.retry_backoff_max_s, base=config.redis.retry_backoff_base_s)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kvsync-writer")

    async def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Try to write what is pending for up to ``flush_timeout_s``, then stop."""
        if self._task is None:
            return
        deadline = time.monotonic() + flush_timeout_s
        while self.pending and not self.paused and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._stopping = True
        self._wake.set()
        await stop_tasks([self._task], what="kvsync writer")
        self._task = None

    @property
    def pending_bytes(self) -> int:
        return sum(p.num_bytes for p in self.pending.values())

    @property
    def max_snapshot_bytes(self) -> int:
        """The largest snapshot (wire bytes) this sidecar takes."""
        body, cap = self.config.server.max_body_bytes, self.config.store.max_memory_bytes
        return min(body, cap) if cap else body

    def state(self) -> dict[str, Any]:
        return {
            "pending_sessions": len(self.pending),
            "pending_bytes": self.pending_bytes,
            "replication_paused": self.paused,
            "lag_s": self._lag_s(),
            "tracked_sessions": len(self.chains),
            "block_tokens": self.block_tokens,
            "max_snapshot_bytes": self.max_snapshot_bytes,
        }

    # -- accepting snapshots -------------------------------------------------------------------------------
    async def accept(self, session_id: str, body: bytes | bytearray) -> PublishReply:
        """Take one posted snapshot (wire form). Never touches Redis."""
        max_bytes = self.max_snapshot_bytes
        if len(body) > max_bytes:
            self.metrics.snapshots_refused.labels("too_large").inc()
            return PublishReply("too_large", f"a snapshot of {len(body)} bytes exceeds the {max_bytes} bytes "
                                             "this sidecar keeps (store.max_memory_bytes, server.max_body_bytes)")
        cap = self.config.writer.max_pending_bytes
        if self.pending_bytes + len(body) > cap:
            self.metrics.snapshots_refused.labels("busy").inc()
            return PublishReply("busy", f"{self.pending_bytes} bytes are waiting for Redis (cap {cap})")
        try:
            snapshot = await asyncio.to_thread(decode_snapshot, body)
            self._check(session_id, snapshot)
        except ValueError as e:
            self.metrics.snapshots_refused.labels("invalid").inc()
            return PublishReply("invalid", str(e))
        chain = self.chains.get(session_id)
        base = self._base_for(snapshot, chain)
        if base is None:
            self.metrics.snapshots_refused.labels("need_full").inc()
            return PublishReply("need_full", "no base for an incremental snapshot here; send one from token 0")
        store_cfg = self.config.store
        blocks = await asyncio.to_thread(split_blocks, snapshot, self.block_tokens, base,
                                         store_cfg.compression, store_cfg.compression_level,
                                         self.store.mac_secret)
        if snapshot.start > 0 and self.chains.get(session_id) is not chain:
            # Another snapshot of this session changed the chain while this one was being cut.
            self.metrics.snapshots_refused.labels("need_full").inc()
            return PublishReply("need_full", "the session changed meanwhile; send one from token 0")
        self._offer(snapshot, chain, base, blocks)
        self.metrics.snapshots_received.labels("incremental" if snapshot.start else "full").inc()
        return PublishReply("accepted", num_new_blocks=len(blocks))

    def _check(self, session_id: str, snapshot: KVSnapshot) -> None:
        ident = snapshot.identity
        if snapshot.session_id != session_id:
            raise ValueError(f"snapshot is for session {snapshot.session_id!r}, posted to {session_id!r}")
        if not snapshot.token_ids:
            raise ValueError("snapshot has no tokens")
        if snapshot_dtype(snapshot) != ident.dtype:
            raise ValueError(f"tensors are {snapshot_dtype(snapshot)}, identity says {ident.dtype}")
        if len(snapshot.keys) != ident.num_layers:
            raise ValueError(f"{len(snapshot.keys)} layers, identity says {ident.num_layers}")
        shape = tuple(snapshot.keys[0].shape)
        if shape[0] != ident.num_kv_heads or shape[2] != ident.head_dim:
            raise ValueError(f"tensors are {shape}, identity says {ident.num_kv_heads} heads of {ident.head_dim}")

    def _base_for(self, snapshot: KVSnapshot, chain: Chain | None) -> list[BlockRef] | None:
        """The chain an incremental snapshot continues, or None when this sidecar lacks it."""
        start, bt = snapshot.start, self.block_tokens
        if start == 0:
            return []
        if start % bt or chain is None or chain.identity != snapshot.identity:
            return None
        nb = start // bt
        if nb > len(chain.blocks) or any(b.num_tokens != bt for b in chain.blocks[:nb]):
            return None
        if chain.token_ids[:start] != list(snapshot.token_ids[:start]):
            return None
        return chain.blocks[:nb]

    def _offer(self, snapshot: KVSnapshot, chain: Chain | None, base: list[BlockRef],
               blocks: list[Block]) -> None:
        sid = snapshot.session_id
        transcript = snapshot.transcript
        if transcript is None and chain is not None:
            transcript = chain.transcript
        refs = base + [b.ref for b in blocks]
        manifest = Manifest(
            session_id=sid, identity=snapshot.identity, token_ids=list(snapshot.token_ids),
            block_tokens=self.block_tokens, dtype=snapshot.identity.dtype, blocks=refs,
            compression=self.config.store.compression, transcript=transcript, created_at_s=time.time())
        new_blocks = {b.ref.store_id: b for b in blocks}
        accepted_at = time.monotonic()
        old = self.pending.pop(sid, None)
        if old is not None:
            self.metrics.snapshots_coalesced.inc()
            accepted_at = old.accepted_at_s
            wanted = {r.store_id for r in refs}
            for key, b in old.blocks.items():
                if key in wanted and key not in new_blocks:
                    new_blocks[key] = b
        self.pending[sid] = PendingWrite(manifest, new_blocks, accepted_at)
        self.chains[sid] = Chain(snapshot.identity, list(snapshot.token_ids), refs, transcript)
        self.chains.move_to_end(sid)
        while len(self.chains) > self.config.writer.max_tracked_sessions:
            self.chains.popitem(last=False)
        self.update_gauges()
        self._wake.set()

    def remember(self, manifest: Manifest) -> None:
        """After a restore: the session's chain in Redis is ``manifest``'s, so the replica's next
        incremental snapshot can build on it."""
        if manifest.block_tokens != self.block_tokens or manifest.session_id in self.pending:
            return
        self.chains[manifest.session_id] = Chain(manifest.identity, list(manifest.token_ids),
                                                 list(manifest.blocks), manifest.transcript)
        self.chains.move_to_end(manifest.session_id)
        self.committed_tokens[manifest.session_id] = len(manifest.token_ids)
        while len(self.chains) > self.config.writer.max_tracked_sessions:
            self.chains.popitem(last=False)

    def forget(self, session_id: str) -> None:
        """Drop a session's pending write and chain (it was deleted)."""
        self.pending.pop(session_id, None)
        self.chains.pop(session_id, None)
        self.committed_tokens.pop(session_id, None)

    # -- writing -----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            sid, write = next(iter(self.pending.items()))
            op = "write"
            try:
                await self._write(sid, write)
                op = "ok"
            except REDIS_FAILURES as e:
                self.num_failures += 1
                self.metrics.redis_errors.labels(op).inc()
                if not self.paused:
                    self.paused = True
                    self.metrics.replication_paused.set(1)
                    log.warning("kvsync: Redis write failed (%s: %s); replication paused, retrying with backoff",
                                type(e).__name__, e)
                self.update_gauges()
                await asyncio.sleep(self._backoff.compute(self.num_failures))
                continue
            except Exception:  # noqa: BLE001 - one bad write must not end replication for every session
                log.exception("kvsync: writing session %s failed unexpectedly; its snapshot is dropped and "
                              "its next one must be full", sid)
                self.metrics.snapshots_abandoned.labels("error").inc()
                if self.pending.get(sid) is write:
                    del self.pending[sid]
                self.forget(sid)
                self.update_gauges()
                continue
            if self.paused:
                log.warning("kvsync: Redis reachable again after %d failed writes; replication resumed",
                            self.num_failures)
                self.paused = False
                self.metrics.replication_paused.set(0)
            self.num_failures = 0
            self.update_gauges()

    async def _write(self, sid: str, write: PendingWrite) -> None:
        await self._upload(write, [b for k, b in write.blocks.items() if k not in write.uploaded])
        result = await self.store.commit(write.manifest)
        if not result.committed:
            missing = set(result.missing)
            if missing <= set(write.blocks):
                # Our own blocks vanished (evicted or Redis restarted) before the manifest: resend once.
                await self._upload(write, [write.blocks[k] for k in missing])
                result = await self.store.commit(write.manifest)
        if not result.committed:
            self.metrics.snapshots_abandoned.labels("base_lost").inc()
            log.info("kvsync: session %s lost its base blocks in Redis; its next snapshot must be full", sid)
            if self.pending.get(sid) is write:
                del self.pending[sid]
            self.chains.pop(sid, None)
            return
        self.metrics.manifests_written.inc()
        self.metrics.store_bytes.set(result.total_bytes)
        if result.evicted:
            self.metrics.sessions_evicted.inc(len(result.evicted))
        if result.expired:
            self.metrics.sessions_expired.inc(len(result.expired))
        for gone in result.evicted + result.expired:
            self.chains.pop(gone, None)
            self.committed_tokens.pop(gone, None)
        self.committed_tokens[sid] = len(write.manifest.token_ids)
        current = self.pending.get(sid)
        if current is write:
            del self.pending[sid]
        elif current is not None:
            # A newer snapshot arrived meanwhile; what this manifest names is now in Redis.
            for ref in write.manifest.blocks:
                if ref.store_id in current.blocks and ref.store_id in write.uploaded:
                    current.uploaded.add(ref.store_id)

    async def _upload(self, write: PendingWrite, blocks: list[Block]) -> None:
        if not blocks:
            return
        await self.store.put_blocks(blocks)
        write.uploaded.update(b.ref.store_id for b in blocks)
        self.metrics.blocks_written.inc(len(blocks))
        self.metrics.snapshot_bytes_written.inc(sum(len(b.data) for b in blocks))

    # -- gauges --------------------------------------------------------------------------------------------
    def _lag_s(self) -> float:
        if not self.pending:
            return 0.0
        return max(0.0, time.monotonic() - min(p.accepted_at_s for p in self.pending.values()))

    def update_gauges(self) -> None:
        self.metrics.pending_sessions.set(len(self.pending))
        self.metrics.pending_bytes.set(self.pending_bytes)
        self.metrics.replication_lag_seconds.set(self._lag_s())
        self.metrics.replication_lag_tokens.set(sum(
            max(0, len(p.manifest.token_ids) - self.committed_tokens.get(sid, 0))
            for sid, p in self.pending.items()))
