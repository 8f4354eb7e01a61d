"""The sidecar's Prometheus metrics, prefix ``unbroken_kvsync_``, served at ``GET /metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "unbroken_kvsync_"
RESTORE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class KVSyncMetrics:
    """One registry per sidecar (so tests can run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.snapshots_received = Counter(
            PREFIX + "snapshots_received_total", "Snapshots accepted from the replica, by kind.",
            ["kind"], registry=r)
        self.snapshots_refused = Counter(
            PREFIX + "snapshots_refused_total",
            "Snapshots refused: need_full (no base for an incremental one), busy (queue full), "
            "invalid, too_large.", ["reason"], registry=r)
        self.snapshots_coalesced = Counter(
            PREFIX + "snapshots_coalesced_total",
            "Pending snapshots replaced by a newer one of the same session before reaching Redis.",
            registry=r)
        self.snapshots_abandoned = Counter(
            PREFIX + "snapshots_abandoned_total",
            "Accepted snapshots that could not be committed: base blocks gone (base_lost) or an unexpected error.",
            ["reason"], registry=r)
        self.snapshot_bytes_written = Counter(
            PREFIX + "snapshot_bytes_written_total", "Block bytes written to Redis.", registry=r)
        self.blocks_written = Counter(
            PREFIX + "blocks_written_total", "Blocks written to Redis.", registry=r)
        self.manifests_written = Counter(
            PREFIX + "manifests_written_total", "Manifests committed to Redis.", registry=r)
        self.replication_lag_seconds = Gauge(
            PREFIX + "replication_lag_seconds",
            "Age of the oldest snapshot accepted but not yet committed to Redis.", registry=r)
        self.replication_lag_tokens = Gauge(
            PREFIX + "replication_lag_tokens",
            "Tokens accepted but not yet committed to Redis, summed over sessions.", registry=r)
        self.pending_bytes = Gauge(
            PREFIX + "pending_bytes", "Block bytes held in memory waiting for Redis.", registry=r)
        self.pending_sessions = Gauge(
            PREFIX + "pending_sessions", "Sessions with a snapshot waiting for Redis.", registry=r)
        self.replication_paused = Gauge(
            PREFIX + "replication_paused", "1 while Redis writes are failing and being retried.", registry=r)
        self.redis_errors = Counter(
            PREFIX + "redis_errors_total", "Failed Redis operations, by operation.", ["op"], registry=r)
        self.restores = Counter(
            PREFIX + "restores_total",
            "Restore requests by outcome: restored, missing, mismatch, corrupt, timeout, error.",
            ["outcome"], registry=r)
        self.restore_handoffs = Counter(
            PREFIX + "restore_handoffs_total",
            "Restored snapshots by how they reached the replica: shm (a shared-memory file) or http.",
            ["via"], registry=r)
        self.restored_tokens = Counter(
            PREFIX + "restored_tokens_total", "Tokens of KV handed back to the replica.", registry=r)
        self.restore_seconds = Histogram(
            PREFIX + "restore_seconds", "Time to answer a restore request (Redis read, checks, assembly).",
            buckets=RESTORE_BUCKETS_S, registry=r)
        self.bad_data = Counter(
            PREFIX + "bad_data_total",
            "Snapshots in Redis found unusable, by reason (manifest, missing_block, truncated, "
            "checksum, shape, dtype, chain, decompress).", ["reason"], registry=r)
        self.sessions_evicted = Counter(
            PREFIX + "sessions_evicted_total", "Sessions evicted from Redis by the memory cap (LRU).",
            registry=r)
        self.sessions_expired = Counter(
            PREFIX + "sessions_expired_total",
            "Sessions whose snapshot expired (TTL), dropped from the memory accounting at a later write.",
            registry=r)
        self.store_bytes = Gauge(
            PREFIX + "store_bytes", "Bytes of kvsync sessions in Redis as of the last commit.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
