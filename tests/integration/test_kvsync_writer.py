"""The sidecar's writer against a real Redis: an unexpected error while writing one session drops
that session's snapshot (its next one must be full) and replication goes on for every other."""

from __future__ import annotations

import asyncio

import pytest

from kvsync.config import KVSyncConfig
from kvsync.metrics import KVSyncMetrics
from kvsync.protocol import encode_snapshot
from kvsync.store import KVStore
from kvsync.testing import snapshot_of, synthetic_identity, synthetic_kv
from kvsync.writer import ReplicationWriter

IDENT = synthetic_identity()


def test_an_unexpected_error_drops_one_snapshot_and_the_writer_goes_on(redis_url: str) -> None:
    async def run() -> None:
        config = KVSyncConfig.model_validate({"redis": {"url": redis_url}, "store": {"block_tokens": 8}})
        metrics = KVSyncMetrics()
        store = KVStore(config.redis, config.store)
        writer = ReplicationWriter(store, config, metrics)
        real_commit = store.commit

        async def commit(manifest):  # type: ignore[no-untyped-def]
            if manifest.session_id == "bad":
                raise RuntimeError("a bug in the write path")
            return await real_commit(manifest)

        store.commit = commit  # type: ignore[method-assign]
        writer.start()
        try:
            keys, values = synthetic_kv(IDENT, 16, seed=1)
            for sid in ("bad", "good"):
                reply = await writer.accept(sid, encode_snapshot(snapshot_of(sid, IDENT, list(range(16)), keys, values)))
                assert reply.status == "accepted", reply
            async with asyncio.timeout(10):
                while writer.pending:
                    await asyncio.sleep(0.02)
            assert writer._task is not None and not writer._task.done()
            assert await store.read_manifest("good") is not None
            assert await store.read_manifest("bad") is None
            assert metrics.snapshots_abandoned.labels("error")._value.get() == 1
            assert "bad" not in writer.chains  # its next snapshot must be full
        finally:
            await writer.stop()
            await store.redis.aclose()

    asyncio.run(run())


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
