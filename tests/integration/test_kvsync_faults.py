"""kvsync under faults, with real processes: Redis killed and restarted, Redis stalled, the
sidecar killed (-9) in the middle of a write, the sidecar gone or full. Serving never waits and
never fails; replication pauses, then catches up; no manifest ever names a missing block."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
import torch

from kvsync.blocks import chain_keys
from kvsync.client import KVSyncClient
from kvsync.protocol import Manifest
from kvsync.testing import (
    metric_value,
    sidecar_state,
    snapshot_of,
    start_sidecar,
    synthetic_identity,
    synthetic_kv,
    wait_replicated,
)
from loadtest.faultproxy import FaultProxy
from unbroken.procs import ManagedProcess, free_port, start_redis

B = 8
PREFIX = "unbroken:kv"
IDENT = synthetic_identity()
FAST_RETRY = {"store.block_tokens": B, "redis.retry_backoff_base_s": 0.05, "redis.retry_backoff_max_s": 0.3,
              "redis.socket_timeout_s": 0.5, "redis.connect_timeout_s": 0.3, "writer.fetch_timeout_s": 1.5}


def _fetch(client: KVSyncClient, session_id: str, timeout_s: float = 5.0):
    return asyncio.run(client.fetch(session_id, IDENT, timeout_s))


def _wait_for(predicate, timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def _assert_every_manifest_names_existing_blocks(r: redis.Redis) -> int:
    num = 0
    for key in r.scan_iter(match=f"{PREFIX}:manifest:*"):
        m = Manifest.from_json(r.get(key), b"")
        missing = [b.key for b in m.blocks if not r.exists(f"{PREFIX}:block:{b.store_id}")]
        assert not missing, f"{key!r} names missing blocks {missing}"
        num += 1
    return num


@pytest.fixture
def client_factory() -> Iterator:
    clients: list[KVSyncClient] = []

    def make(url: str, **kw: int) -> KVSyncClient:
        c = KVSyncClient(url, block_tokens=B, **kw)
        c.start()
        clients.append(c)
        return c

    try:
        yield make
    finally:
        for c in clients:
            c.close(timeout_s=2)


def test_redis_killed_and_restarted_replication_pauses_then_catches_up(
        redis_proc: tuple[ManagedProcess, str], tmp_path: Path, client_factory) -> None:
    redis_server, url = redis_proc
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    proc, sidecar = start_sidecar(url, log_path=tmp_path / "kvsync.log", settings=FAST_RETRY)
    restarted: ManagedProcess | None = None
    try:
        client = client_factory(sidecar)
        keys, values = synthetic_kv(IDENT, 48, seed=1)
        tokens = list(range(48))
        assert client.publish(snapshot_of("s1", IDENT, tokens[:20], keys, values))
        wait_replicated(sidecar, client=client)

        redis_server.kill()
        # The sidecar keeps taking snapshots: an incremental one of s1 and a new session s2,
        # then a newer s1 that coalesces with the pending one.
        assert client.publish(snapshot_of("s1", IDENT, tokens[:40], keys, values, start=16))
        assert client.publish(snapshot_of("s2", IDENT, list(range(100, 130)), keys, values))
        assert client.publish(snapshot_of("s1", IDENT, tokens, keys, values, start=32))
        _wait_for(lambda: client.num_in_flight == 0, what="the client to hand everything over")
        assert client.num_published == 4 and not client.needs_full("s1")
        _wait_for(lambda: metric_value(sidecar, "unbroken_kvsync_replication_paused") == 1, what="pause")
        assert metric_value(sidecar, "unbroken_kvsync_redis_errors_total", {"op": "write"}) >= 1
        assert metric_value(sidecar, "unbroken_kvsync_snapshots_coalesced_total") == 1
        state = sidecar_state(sidecar)
        assert state["pending_sessions"] == 2 and state["replication_paused"]
        assert metric_value(sidecar, "unbroken_kvsync_replication_lag_tokens") == (48 - 20) + 30
        # A restore while Redis is down answers at once, without a snapshot.
        t0 = time.monotonic()
        assert _fetch(client, "s1").outcome in ("error", "timeout")
        assert time.monotonic() - t0 < 3.0

        # Redis comes back empty (a restart without persistence). s2 (full) is written; s1's
        # pending write builds on blocks that died with Redis, so it is abandoned and the
        # replica is asked for a full snapshot at its next one.
        restarted, _ = start_redis(port=port, log_path=tmp_path / "redis2.log")
        wait_replicated(sidecar, client=client, timeout_s=20)
        assert metric_value(sidecar, "unbroken_kvsync_replication_paused") == 0
        assert metric_value(sidecar, "unbroken_kvsync_replication_lag_seconds") == 0
        assert _fetch(client, "s2").outcome == "restored"
        assert _fetch(client, "s1").outcome == "missing"
        assert metric_value(sidecar, "unbroken_kvsync_snapshots_abandoned_total", {"reason": "base_lost"}) == 1
        assert client.publish(snapshot_of("s1", IDENT, tokens, keys, values, start=40))
        wait_replicated(sidecar, client=client)
        assert client.needs_full("s1")
        assert client.publish(snapshot_of("s1", IDENT, tokens, keys, values))  # what the engine does next
        wait_replicated(sidecar, client=client)
        res = _fetch(client, "s1")
        assert res.outcome == "restored" and not client.needs_full("s1")
        for got, want in zip(res.snapshot.keys, keys):
            assert torch.equal(got, want)
        assert _assert_every_manifest_names_existing_blocks(redis.Redis.from_url(url)) == 2
        log = (tmp_path / "kvsync.log").read_text()
        assert log.count("replication paused") == 1 and log.count("replication resumed") == 1
    finally:
        proc.stop()
        if restarted is not None:
            restarted.stop()


def test_pending_writes_survive_an_outage_when_they_carry_their_base(
        redis_proc: tuple[ManagedProcess, str], tmp_path: Path, client_factory) -> None:
    """Snapshots taken entirely during an outage (full, then incremental on it) all reach Redis."""
    redis_server, url = redis_proc
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    proc, sidecar = start_sidecar(url, log_path=tmp_path / "kvsync.log", settings=FAST_RETRY)
    restarted: ManagedProcess | None = None
    try:
        client = client_factory(sidecar)
        redis_server.kill()
        keys, values = synthetic_kv(IDENT, 40, seed=2)
        assert client.publish(snapshot_of("s1", IDENT, list(range(20)), keys, values))
        assert client.publish(snapshot_of("s1", IDENT, list(range(40)), keys, values, start=16))
        _wait_for(lambda: metric_value(sidecar, "unbroken_kvsync_replication_paused") == 1, what="pause")
        restarted, _ = start_redis(port=port, log_path=tmp_path / "redis2.log")
        wait_replicated(sidecar, client=client, timeout_s=20)
        res = _fetch(client, "s1")
        assert res.outcome == "restored" and len(res.snapshot.token_ids) == 40
        for got, want in zip(res.snapshot.values, values):
            assert torch.equal(got, want)
    finally:
        proc.stop()
        if restarted is not None:
            restarted.stop()


def test_stalled_redis_pauses_replication_and_restores_time_out(
        redis_url: str, tmp_path: Path, client_factory) -> None:
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with FaultProxy(redis_port) as proxy:
        proc, sidecar = start_sidecar(f"redis://127.0.0.1:{proxy.listen_port}/0", log_path=tmp_path / "k.log",
                                      settings=FAST_RETRY)
        try:
            client = client_factory(sidecar)
            keys, values = synthetic_kv(IDENT, 20, seed=3)
            assert client.publish(snapshot_of("s1", IDENT, list(range(20)), keys, values))
            wait_replicated(sidecar, client=client)
            proxy.set_fault(stall=True)
            assert client.publish(snapshot_of("s2", IDENT, list(range(20)), keys, values))
            t0 = time.monotonic()
            assert _fetch(client, "s1", timeout_s=5.0).outcome in ("timeout", "error")
            assert time.monotonic() - t0 < 3.0  # the sidecar's own fetch_timeout_s (1.5 s)
            _wait_for(lambda: metric_value(sidecar, "unbroken_kvsync_replication_paused") == 1, what="pause")
            proxy.clear()
            proxy.reset_connections()
            wait_replicated(sidecar, client=client, timeout_s=20)
            assert _fetch(client, "s2").outcome == "restored"
        finally:
            proc.stop()


def test_sidecar_killed_mid_write_leaves_no_manifest_naming_missing_blocks(
        redis_url: str, tmp_path: Path, client_factory) -> None:
    r = redis.Redis.from_url(redis_url)
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    keys, values = synthetic_kv(IDENT, 40, seed=4)
    tokens = list(range(40))
    with FaultProxy(redis_port) as proxy:
        proc, sidecar = start_sidecar(f"redis://127.0.0.1:{proxy.listen_port}/0", log_path=tmp_path / "k.log",
                                      settings={"store.block_tokens": B, "redis.socket_timeout_s": 30})
        try:
            client = client_factory(sidecar)
            assert client.publish(snapshot_of("s1", IDENT, tokens[:20], keys, values))
            wait_replicated(sidecar, client=client)
            # Redis executes the next writes, but its replies are held: the writer is stuck between
            # "blocks sent" and "manifest", where it is killed.
            proxy.set_fault(stall=True, direction="downstream")
            assert client.publish(snapshot_of("s1", IDENT, tokens, keys, values, start=16))
            new_keys = chain_keys(IDENT, tokens, B)[2:]
            _wait_for(lambda: all(r.keys(f"{PREFIX}:block:{k}.*") for k in new_keys), what="new blocks in Redis")
            time.sleep(0.2)
            proc.kill()
        finally:
            proc.stop()
    # The old manifest stands, whole; the new blocks are orphans that expire.
    m = Manifest.from_json(r.get(f"{PREFIX}:manifest:s1"), b"")
    assert m.token_ids == tokens[:20]
    assert _assert_every_manifest_names_existing_blocks(r) == 1
    assert all(r.pttl(r.keys(f"{PREFIX}:block:{k}.*")[0]) > 0 for k in new_keys)
    assert not {b.key for b in m.blocks} & set(new_keys[1:])
    # And a fresh sidecar restores exactly the old snapshot.
    proc2, sidecar2 = start_sidecar(redis_url, log_path=tmp_path / "k2.log", settings={"store.block_tokens": B})
    try:
        res = _fetch(client_factory(sidecar2), "s1")
        assert res.outcome == "restored" and res.snapshot.token_ids == tokens[:20]
        for got, want in zip(res.snapshot.keys, keys):
            assert torch.equal(got, want[:, :20])
    finally:
        proc2.stop()


def test_commit_refuses_a_manifest_whose_blocks_are_not_all_there(redis_url: str) -> None:
    """The store-level guarantee the writer relies on, checked directly."""
    from kvsync.blocks import split_blocks
    from kvsync.config import KVSyncConfig
    from kvsync.store import KVStore

    cfg = KVSyncConfig.model_validate({"redis": {"url": redis_url}, "store": {"block_tokens": B}})
    keys, values = synthetic_kv(IDENT, 20, seed=5)
    snap = snapshot_of("s1", IDENT, list(range(20)), keys, values)
    blocks = split_blocks(snap, B, [])
    manifest = Manifest("s1", IDENT, snap.token_ids, B, "float32", [b.ref for b in blocks])

    async def run() -> None:
        store = KVStore(cfg.redis, cfg.store)
        try:
            await store.put_blocks(blocks[:2])
            result = await store.commit(manifest)
            assert not result.committed and result.missing == [blocks[2].ref.store_id]
            assert await store.read_manifest("s1") is None
            await store.put_blocks(blocks[2:])
            assert (await store.commit(manifest)).committed
            assert await store.read_manifest("s1") is not None
        finally:
            await store.close()

    asyncio.run(run())


def test_publish_never_blocks_when_the_sidecar_is_gone(client_factory) -> None:
    client = client_factory(f"http://127.0.0.1:{free_port()}", max_pending=2)
    keys, values = synthetic_kv(IDENT, 16)
    snap = snapshot_of("s1", IDENT, list(range(16)), keys, values)
    worst = 0.0
    results = []
    for _ in range(50):
        t0 = time.monotonic()
        results.append(client.publish(snap))
        worst = max(worst, time.monotonic() - t0)
    assert worst < 0.01
    _wait_for(lambda: client.num_in_flight == 0, what="the client to give up on the queued snapshots")
    assert client.num_failed + client.num_dropped == 50 and client.num_failed >= 1
    assert results.count(False) == client.num_dropped
    assert client.needs_full("s1")
    assert _fetch(client, "s1", timeout_s=2.0).outcome == "error"


def test_a_full_sidecar_refuses_as_busy_and_asks_for_a_full_snapshot(
        redis_url: str, tmp_path: Path, client_factory) -> None:
    keys, values = synthetic_kv(IDENT, 64, seed=6)
    one = len(snapshot_of("x", IDENT, list(range(64)), keys, values).keys) * 2 * 2 * 64 * 8 * 4  # 8 KiB
    with FaultProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0])) as proxy:
        proxy.set_fault(stall=True)
        proc, sidecar = start_sidecar(f"redis://127.0.0.1:{proxy.listen_port}/0", log_path=tmp_path / "k.log",
                                      settings={**FAST_RETRY, "writer.max_pending_bytes": int(one * 2.5)})
        try:
            client = client_factory(sidecar, max_pending=8)
            for sid in ("a", "b", "c"):
                assert client.publish(snapshot_of(sid, IDENT, list(range(64)), keys, values))
            _wait_for(lambda: client.num_in_flight == 0, what="hand-over")
            assert client.num_published == 2 and client.num_refused == 1 and client.needs_full("c")
            assert metric_value(sidecar, "unbroken_kvsync_snapshots_refused_total", {"reason": "busy"}) == 1
            proxy.clear()
            proxy.reset_connections()
            wait_replicated(sidecar, client=client, timeout_s=20)
            assert client.publish(snapshot_of("c", IDENT, list(range(64)), keys, values))
            wait_replicated(sidecar, client=client)
            assert not client.needs_full("c") and _fetch(client, "c").outcome == "restored"
        finally:
            proc.stop()


def test_client_reconnects_after_the_sidecar_restarts(redis_url: str, tmp_path: Path, client_factory) -> None:
    """A kept-alive connection to a sidecar that went away is retried once, afresh."""
    port = free_port()
    keys, values = synthetic_kv(IDENT, 16, seed=7)
    proc, sidecar = start_sidecar(redis_url, port=port, log_path=tmp_path / "k1.log", settings={"store.block_tokens": B})
    client = client_factory(sidecar)
    try:
        assert client.publish(snapshot_of("s1", IDENT, list(range(16)), keys, values))
        wait_replicated(sidecar, client=client)
    finally:
        proc.stop()
    proc, sidecar = start_sidecar(redis_url, port=port, log_path=tmp_path / "k2.log", settings={"store.block_tokens": B})
    try:
        assert client.publish(snapshot_of("s2", IDENT, list(range(50, 66)), keys, values))
        wait_replicated(sidecar, client=client)
        assert client.num_failed == 0 and client.num_published == 2
        assert _fetch(client, "s2").outcome == "restored"
    finally:
        proc.stop()
