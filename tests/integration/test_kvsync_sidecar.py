"""The kvsync sidecar as a real process against a real redis-server, driven by the real
``KVSyncClient`` with synthetic KV: write/read, incremental blocks, TTL, the LRU memory cap,
bad data in Redis, and an event loop that never blocks."""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import orjson
import pytest
import redis
import torch

from kvsync.blocks import chain_keys
from kvsync.client import KVSyncClient
from kvsync.protocol import BlockRef, Manifest, block_mac
from kvsync.testing import (
    metric_value,
    snapshot_of,
    start_sidecar,
    synthetic_identity,
    synthetic_kv,
    wait_replicated,
)

B = 8
PREFIX = "unbroken:kv"
IDENT = synthetic_identity()
TRANSCRIPT = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]


@pytest.fixture
def sidecar(redis_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    settings = {"store.block_tokens": B, **getattr(request, "param", {})}
    proc, url = start_sidecar(redis_url, log_path=tmp_path / "kvsync.log", settings=settings)
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture
def client(sidecar: str) -> Iterator[KVSyncClient]:
    c = KVSyncClient(sidecar, block_tokens=B, max_pending=8)
    c.start()
    try:
        yield c
    finally:
        c.close()


def _fetch(client: KVSyncClient, session_id: str, identity=IDENT, timeout_s: float = 10.0):
    return asyncio.run(client.fetch(session_id, identity, timeout_s))


def _assert_kv_equal(snapshot, keys, values, n: int) -> None:
    assert snapshot.start == 0 and len(snapshot.token_ids) == n
    for got, want in zip(snapshot.keys + snapshot.values, keys + values):
        assert torch.equal(got, want[:, :n])


def test_write_then_read_back_exactly(client: KVSyncClient, sidecar: str, redis_url: str) -> None:
    keys, values = synthetic_kv(IDENT, 21)
    tokens = list(range(500, 521))
    assert client.publish(snapshot_of("s1", IDENT, tokens, keys, values, transcript=TRANSCRIPT))
    wait_replicated(sidecar, client=client)
    res = _fetch(client, "s1")
    assert res.outcome == "restored" and res.transcript == TRANSCRIPT
    assert res.snapshot.token_ids == tokens
    _assert_kv_equal(res.snapshot, keys, values, 21)
    # Blocks in Redis are exactly the chain of the token ids (3 blocks: 8, 8, 5 tokens).
    r = redis.Redis.from_url(redis_url)
    manifest = Manifest.from_json(r.get(f"{PREFIX}:manifest:s1"), b"")
    assert [b.key for b in manifest.blocks] == chain_keys(IDENT, tokens, B)
    assert [b.num_tokens for b in manifest.blocks] == [8, 8, 5]
    assert all(r.exists(f"{PREFIX}:block:{b.store_id}") for b in manifest.blocks)
    # Unknown session, another model, another adapter.
    assert _fetch(client, "nobody").outcome == "missing"
    other = _fetch(client, "s1", synthetic_identity(revision="r2"))
    # Another identity gets nothing of the session, not even its transcript.
    assert other.outcome == "mismatch" and other.snapshot is None and other.transcript is None
    assert _fetch(client, "s1", synthetic_identity(adapter="lora")).outcome == "mismatch"
    assert metric_value(sidecar, "unbroken_kvsync_restores_total", {"outcome": "restored"}) == 1
    assert metric_value(sidecar, "unbroken_kvsync_restores_total", {"outcome": "mismatch"}) == 2
    assert metric_value(sidecar, "unbroken_kvsync_restore_seconds_count") == 4


def test_incremental_snapshots_send_only_new_blocks(client: KVSyncClient, sidecar: str) -> None:
    keys, values = synthetic_kv(IDENT, 40, seed=3)
    tokens = list(range(1000, 1040))
    assert client.publish(snapshot_of("s1", IDENT, tokens[:20], keys, values))  # blocks 0-8, 8-16, 16-20
    wait_replicated(sidecar, client=client)
    assert metric_value(sidecar, "unbroken_kvsync_blocks_written_total") == 3
    # The next turn: 40 tokens, sent from token 16 (the partial block is re-sent whole).
    inc = snapshot_of("s1", IDENT, tokens, keys, values, start=16, transcript=TRANSCRIPT)
    assert inc.keys[0].shape[1] == 24
    assert client.publish(inc)
    wait_replicated(sidecar, client=client)
    assert metric_value(sidecar, "unbroken_kvsync_blocks_written_total") == 6
    assert metric_value(sidecar, "unbroken_kvsync_snapshots_received_total", {"kind": "incremental"}) == 1
    assert not client.needs_full("s1")
    res = _fetch(client, "s1")
    assert res.outcome == "restored" and res.transcript == TRANSCRIPT
    _assert_kv_equal(res.snapshot, keys, values, 40)
    # A snapshot without a transcript keeps the last one.
    assert client.publish(snapshot_of("s1", IDENT, tokens, keys, values, start=32))
    wait_replicated(sidecar, client=client)
    assert _fetch(client, "s1").transcript == TRANSCRIPT


def test_incremental_without_a_base_asks_for_a_full_one(client: KVSyncClient, sidecar: str) -> None:
    keys, values = synthetic_kv(IDENT, 30, seed=4)
    tokens = list(range(30))
    assert client.publish(snapshot_of("fresh", IDENT, tokens, keys, values, start=16))
    wait_replicated(sidecar, client=client)
    assert client.needs_full("fresh") and client.num_refused == 1
    assert _fetch(client, "fresh").outcome == "missing"
    # A base that differs in its tokens is no base either.
    assert client.publish(snapshot_of("s2", IDENT, tokens, keys, values))
    wait_replicated(sidecar, client=client)
    assert client.publish(snapshot_of("s2", IDENT, [7] + tokens[1:], keys, values, start=16))
    wait_replicated(sidecar, client=client)
    assert client.needs_full("s2")
    # The engine then sends a full one, which clears the flag.
    assert client.publish(snapshot_of("fresh", IDENT, tokens, keys, values))
    wait_replicated(sidecar, client=client)
    assert not client.needs_full("fresh")
    assert _fetch(client, "fresh").outcome == "restored"
    assert metric_value(sidecar, "unbroken_kvsync_snapshots_refused_total", {"reason": "need_full"}) == 2


def test_a_restored_session_continues_incrementally_on_another_sidecar(
        client: KVSyncClient, sidecar: str, redis_url: str, tmp_path: Path) -> None:
    keys, values = synthetic_kv(IDENT, 40, seed=5)
    tokens = list(range(40))
    assert client.publish(snapshot_of("s1", IDENT, tokens[:20], keys, values))
    wait_replicated(sidecar, client=client)
    proc_b, url_b = start_sidecar(redis_url, log_path=tmp_path / "b.log", settings={"store.block_tokens": B})
    client_b = KVSyncClient(url_b, block_tokens=B)
    client_b.start()
    try:
        assert _fetch(client_b, "s1").outcome == "restored"
        assert client_b.publish(snapshot_of("s1", IDENT, tokens, keys, values, start=16))
        wait_replicated(url_b, client=client_b)
        assert not client_b.needs_full("s1") and client_b.num_published == 1
        res = _fetch(client, "s1")
        assert res.outcome == "restored"
        _assert_kv_equal(res.snapshot, keys, values, 40)
    finally:
        client_b.close()
        proc_b.stop()


def _handoff_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("unbroken-kvsync-*"))


@pytest.fixture
def handoff_dir(tmp_path: Path) -> Path:
    path = tmp_path / "handoff"
    path.mkdir()
    return path


def test_a_restore_is_handed_over_in_shared_memory_or_over_http(
        redis_url: str, tmp_path: Path, handoff_dir: Path) -> None:
    """The replica asks for shared memory: it gets a file it maps and removes; a client that does
    not ask, or a sidecar without a usable directory, gets the snapshot as the HTTP body; all equal."""
    proc, url = start_sidecar(redis_url, log_path=tmp_path / "kvsync.log",
                              settings={"store.block_tokens": B, "server.handoff_dir": str(handoff_dir)})
    shm, http = KVSyncClient(url, block_tokens=B), KVSyncClient(url, block_tokens=B, shared_memory=False)
    shm.start()
    try:
        keys, values = synthetic_kv(IDENT, 29, seed=3)
        assert shm.publish(snapshot_of("s1", IDENT, list(range(29)), keys, values, transcript=TRANSCRIPT))
        wait_replicated(url, client=shm)
        for client, via in ((shm, "shm"), (http, "http")):
            before = metric_value(url, "unbroken_kvsync_restore_handoffs_total", {"via": via})
            res = _fetch(client, "s1")
            assert res.outcome == "restored" and res.transcript == TRANSCRIPT, via
            _assert_kv_equal(res.snapshot, keys, values, 29)
            assert metric_value(url, "unbroken_kvsync_restore_handoffs_total", {"via": via}) == before + 1
            assert _handoff_files(handoff_dir) == [], "the replica removes the file it took"
        assert shm.shared_memory
    finally:
        shm.close()
        proc.stop()
    # No usable directory: asked for shared memory, the sidecar answers with the body.
    proc, url = start_sidecar(redis_url, log_path=tmp_path / "kvsync2.log",
                              settings={"store.block_tokens": B, "server.handoff_dir": str(tmp_path / "absent")})
    try:
        res = _fetch(KVSyncClient(url, block_tokens=B), "s1")
        assert res.outcome == "restored"
        _assert_kv_equal(res.snapshot, keys, values, 29)
        assert metric_value(url, "unbroken_kvsync_restore_handoffs_total", {"via": "http"}) == 1
    finally:
        proc.stop()


def test_a_replica_that_cannot_open_the_file_falls_back_to_http(
        client: KVSyncClient, sidecar: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica in another container or host cannot open the sidecar's file: it switches shared
    memory off and fetches the same snapshot over HTTP, in the same call."""
    import kvsync.client

    keys, values = synthetic_kv(IDENT, 12, seed=4)
    assert client.publish(snapshot_of("s1", IDENT, list(range(12)), keys, values))
    wait_replicated(sidecar, client=client)
    opened: list[str] = []

    def elsewhere(path: str, size: int):
        opened.append(path)
        raise FileNotFoundError(path)

    monkeypatch.setattr(kvsync.client, "open_handoff", elsewhere)
    res = _fetch(client, "s1")
    assert res.outcome == "restored" and len(opened) == 1 and not client.shared_memory
    _assert_kv_equal(res.snapshot, keys, values, 12)
    res = _fetch(client, "s1")  # and stays on HTTP
    assert res.outcome == "restored" and len(opened) == 1
    assert metric_value(sidecar, "unbroken_kvsync_restore_handoffs_total", {"via": "http"}) == 2
    # The file it could not take stays until the sidecar removes it (a minute later, or when it stops).
    assert Path(opened[0]).exists()


def _keys_with_ttl(r: redis.Redis) -> dict[str, int]:
    return {k.decode(): r.pttl(k) for k in r.scan_iter(match=f"{PREFIX}:*")}


@pytest.mark.parametrize("sidecar", [{"store.ttl_s": 1.0}], indirect=True)
def test_every_key_has_a_ttl_and_snapshots_expire(client: KVSyncClient, sidecar: str, redis_url: str) -> None:
    keys, values = synthetic_kv(IDENT, 12)
    assert client.publish(snapshot_of("s1", IDENT, list(range(12)), keys, values))
    wait_replicated(sidecar, client=client)
    r = redis.Redis.from_url(redis_url)
    ttls = _keys_with_ttl(r)
    assert f"{PREFIX}:manifest:s1" in ttls and any(":block:" in k for k in ttls)
    assert all(t > 0 for t in ttls.values()), ttls  # -1 would mean no TTL
    assert 0 < ttls[f"{PREFIX}:manifest:s1"] <= 1000
    assert all(t > ttls[f"{PREFIX}:manifest:s1"] for k, t in ttls.items() if ":block:" in k)
    time.sleep(1.3)
    assert _fetch(client, "s1").outcome == "missing"


@pytest.mark.parametrize("sidecar", [{"store.ttl_s": 0.5}], indirect=True)
def test_expired_sessions_leave_the_memory_accounting(client: KVSyncClient, sidecar: str, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    keys, values = synthetic_kv(IDENT, 12)
    assert client.publish(snapshot_of("old", IDENT, list(range(12)), keys, values))
    wait_replicated(sidecar, client=client)
    old_bytes = int(r.hget(f"{PREFIX}:bytes", "old"))
    assert int(r.get(f"{PREFIX}:total")) == old_bytes
    time.sleep(0.8)  # "old"'s manifest expires; its index entries are still there
    assert r.get(f"{PREFIX}:manifest:old") is None and r.zscore(f"{PREFIX}:lru", "old") is not None
    keys, values = synthetic_kv(IDENT, 12, seed=3)
    assert client.publish(snapshot_of("new", IDENT, list(range(100, 112)), keys, values))
    wait_replicated(sidecar, client=client)
    assert r.zscore(f"{PREFIX}:lru", "old") is None and r.hget(f"{PREFIX}:bytes", "old") is None
    assert int(r.get(f"{PREFIX}:total")) == int(r.hget(f"{PREFIX}:bytes", "new"))
    assert metric_value(sidecar, "unbroken_kvsync_sessions_expired_total") == 1
    assert metric_value(sidecar, "unbroken_kvsync_sessions_evicted_total") == 0


@pytest.mark.parametrize("sidecar", [{"store.max_memory_bytes": 11000}], indirect=True)
def test_a_session_too_large_for_the_sidecar_is_refused_once_and_not_sent_again(
        client: KVSyncClient, sidecar: str) -> None:
    big_kv = synthetic_kv(IDENT, 64, seed=5)
    assert client.publish(snapshot_of("big", IDENT, list(range(64)), *big_kv))
    wait_replicated(sidecar, client=client)
    assert client.too_large("big") and client.num_too_large == 1
    assert metric_value(sidecar, "unbroken_kvsync_snapshots_refused_total", {"reason": "too_large"}) == 1
    # Its next (larger) snapshot is not posted; a small session still replicates.
    big_kv = synthetic_kv(IDENT, 80, seed=5)
    assert client.publish(snapshot_of("big", IDENT, list(range(80)), *big_kv))
    assert client.publish(snapshot_of("small", IDENT, list(range(8)), *synthetic_kv(IDENT, 8)))
    wait_replicated(sidecar, client=client)
    assert metric_value(sidecar, "unbroken_kvsync_snapshots_refused_total", {"reason": "too_large"}) == 1
    assert _fetch(client, "small").outcome == "restored"
    assert _fetch(client, "big").outcome == "missing"
    # A client that asked the sidecar's limits first does not post it at all.
    fresh = KVSyncClient(sidecar, block_tokens=B)
    assert fresh.sidecar_block_tokens() == B
    assert fresh.max_snapshot_bytes == 11000
    fresh.start()
    try:
        assert fresh.publish(snapshot_of("big2", IDENT, list(range(64)), *synthetic_kv(IDENT, 64, seed=6)))
        wait_replicated(sidecar, client=fresh)
        assert fresh.too_large("big2") and fresh.num_bytes_sent == 0
    finally:
        fresh.close()
    assert metric_value(sidecar, "unbroken_kvsync_snapshots_refused_total", {"reason": "too_large"}) == 1


SESSION_TOKENS = 16  # two blocks; ~2 KB of KV per session with the synthetic identity


@pytest.mark.parametrize("sidecar", [{"store.max_memory_bytes": 11000}], indirect=True)
def test_memory_cap_evicts_least_recently_used_sessions(client: KVSyncClient, sidecar: str, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    kv = {}
    for i, sid in enumerate(["a", "b"]):
        kv[sid] = synthetic_kv(IDENT, SESSION_TOKENS, seed=10 + i)
        assert client.publish(snapshot_of(sid, IDENT, list(range(i * 100, i * 100 + SESSION_TOKENS)), *kv[sid]))
        wait_replicated(sidecar, client=client)
    per_session = int(r.hget(f"{PREFIX}:bytes", "a"))
    assert 2 * per_session <= 11000 < 3 * per_session, per_session
    time.sleep(0.01)
    assert _fetch(client, "a").outcome == "restored"  # "a" is now more recent than "b"
    # "c" shares its first block with "a" (same prefix): content-addressed, stored once.
    kv["c"] = synthetic_kv(IDENT, SESSION_TOKENS, seed=12)
    c_tokens = list(range(0, 8)) + list(range(900, 908))
    c_keys = [torch.cat([a[:, :8], c[:, 8:]], dim=1) for a, c in zip(kv["a"][0], kv["c"][0])]
    c_values = [torch.cat([a[:, :8], c[:, 8:]], dim=1) for a, c in zip(kv["a"][1], kv["c"][1])]
    assert client.publish(snapshot_of("c", IDENT, c_tokens, c_keys, c_values))
    wait_replicated(sidecar, client=client)
    assert _fetch(client, "b").outcome == "missing"  # evicted: least recently used
    assert _fetch(client, "a").outcome == "restored"
    assert _fetch(client, "c").outcome == "restored"
    assert int(r.get(f"{PREFIX}:total")) <= 11000
    assert metric_value(sidecar, "unbroken_kvsync_sessions_evicted_total") == 1
    # "b"'s blocks are gone; the shared block of "a" and "c" is counted twice and kept.
    blocks = {k.decode().split(":")[-1].split(".")[0] for k in r.scan_iter(match=f"{PREFIX}:block:*")}
    b_keys = chain_keys(IDENT, list(range(100, 100 + SESSION_TOKENS)), B)
    a_keys = chain_keys(IDENT, list(range(SESSION_TOKENS)), B)
    c_keys_chain = chain_keys(IDENT, c_tokens, B)
    assert not blocks & set(b_keys)
    assert a_keys[0] == c_keys_chain[0] and blocks == set(a_keys) | set(c_keys_chain)
    shared = Manifest.from_json(r.get(f"{PREFIX}:manifest:a"), b"").blocks[0].store_id
    assert int(r.get(f"{PREFIX}:ref:{shared}")) == 2
    # Evicting "a" next must keep the block "c" still uses.
    kv["d"] = synthetic_kv(IDENT, SESSION_TOKENS, seed=13)
    assert _fetch(client, "c").outcome == "restored"
    assert client.publish(snapshot_of("d", IDENT, list(range(300, 300 + SESSION_TOKENS)), *kv["d"]))
    wait_replicated(sidecar, client=client)
    assert _fetch(client, "a").outcome == "missing"
    res = _fetch(client, "c")
    assert res.outcome == "restored"
    for got, want in zip(res.snapshot.keys, c_keys):
        assert torch.equal(got, want)


def test_equal_prefixes_with_different_bytes_do_not_spoil_each_other(client: KVSyncClient, sidecar: str,
                                                                     redis_url: str) -> None:
    """Two sessions with the same first tokens whose KV is not bit-identical (computed in other
    batches): each keeps its own block, and both restore exactly."""
    tokens = list(range(16))
    kv = {sid: synthetic_kv(IDENT, 16, seed=seed) for sid, seed in (("x", 21), ("y", 22))}
    for sid in ("x", "y"):
        assert client.publish(snapshot_of(sid, IDENT, tokens, *kv[sid]))
        wait_replicated(sidecar, client=client)
    for sid in ("x", "y"):
        res = _fetch(client, sid)
        assert res.outcome == "restored", sid
        _assert_kv_equal(res.snapshot, *kv[sid], 16)
    r = redis.Redis.from_url(redis_url)
    assert len(list(r.scan_iter(match=f"{PREFIX}:block:*"))) == 4  # 2 blocks each, none shared


def _put_manifest(r: redis.Redis, m: Manifest) -> None:
    r.set(f"{PREFIX}:manifest:{m.session_id}", m.to_json(b""), px=60_000)


def test_bad_data_in_redis_is_detected_and_ignored(client: KVSyncClient, sidecar: str, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    keys, values = synthetic_kv(IDENT, 20, seed=7)
    sessions = ("trunc", "flip", "dtype", "shape", "gone", "other", "garbage")
    tokens = {sid: list(range(i * 100, i * 100 + 20)) for i, sid in enumerate(sessions)}  # no shared blocks
    for sid in sessions:
        assert client.publish(snapshot_of(sid, IDENT, tokens[sid], keys, values, transcript=TRANSCRIPT))
    wait_replicated(sidecar, client=client)

    def manifest(sid: str) -> Manifest:
        return Manifest.from_json(r.get(f"{PREFIX}:manifest:{sid}"), b"")

    def block_key(sid: str) -> str:
        return f"{PREFIX}:block:{manifest(sid).blocks[1].store_id}"

    blob = r.get(block_key("trunc"))
    r.set(block_key("trunc"), blob[:-10], keepttl=True)
    r.set(block_key("flip"), bytes([blob[0] ^ 0xFF]) + blob[1:], keepttl=True)
    r.delete(block_key("gone"))
    m = manifest("dtype")
    m.dtype = "bfloat16"
    _put_manifest(r, m)
    # Another model's KV under this session: a manifest with another identity.
    m = manifest("other")
    m.identity = synthetic_identity(num_kv_heads=1)
    _put_manifest(r, m)
    # Data of another shape, with the manifest's checksum and size made to match it.
    m = manifest("shape")
    small = blob[: len(blob) // 2]
    m.blocks[1] = BlockRef(m.blocks[1].key, 8, len(small), m.blocks[1].raw_bytes, zlib.crc32(small),
                           block_mac(b"", m.blocks[1].key, 8, m.blocks[1].raw_bytes, small))
    r.set(f"{PREFIX}:block:{m.blocks[1].store_id}", small, px=60_000)
    _put_manifest(r, m)
    r.set(f"{PREFIX}:manifest:garbage", b"\x00\x01 not json", px=60_000)

    outcomes = {sid: _fetch(client, sid) for sid in ("trunc", "flip", "dtype", "shape", "gone", "other", "garbage")}
    assert {sid: res.outcome for sid, res in outcomes.items()} == {
        "trunc": "corrupt", "flip": "corrupt", "dtype": "corrupt", "shape": "corrupt",
        "gone": "missing", "other": "mismatch", "garbage": "corrupt"}
    assert all(res.snapshot is None for res in outcomes.values())
    # The transcript is still handed back where the manifest itself is readable (for re-prefill).
    assert outcomes["trunc"].transcript == TRANSCRIPT and outcomes["garbage"].transcript is None
    for reason in ("truncated", "mac", "dtype", "shape", "missing_block", "manifest"):
        assert metric_value(sidecar, "unbroken_kvsync_bad_data_total", {"reason": reason}) >= 1, reason
    # The sidecar still serves good sessions, and a new snapshot replaces a bad one.
    assert client.publish(snapshot_of("trunc", IDENT, tokens["trunc"], keys, values))
    wait_replicated(sidecar, client=client)
    assert _fetch(client, "trunc").outcome == "restored"


def test_event_loop_keeps_answering_while_a_large_snapshot_is_handled(
        client: KVSyncClient, sidecar: str) -> None:
    ident = synthetic_identity(num_layers=8, num_kv_heads=4, head_dim=64)
    n = 8 * 1024  # 8 layers x 2 x 4 x 8192 x 64 x 4 bytes = 128 MiB
    keys, values = synthetic_kv(ident, n)
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            with urllib.request.urlopen(sidecar + "/health", timeout=10) as resp:
                assert resp.status == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.01)

    t = threading.Thread(target=poll)
    t.start()
    try:
        snap = snapshot_of("big", ident, list(range(n)), keys, values)
        t0 = time.monotonic()
        assert client.publish(snap)
        publish_s = time.monotonic() - t0
        wait_replicated(sidecar, client=client, timeout_s=60)
        res = asyncio.run(client.fetch("big", ident, 60))
    finally:
        stop.set()
        t.join(15)
    assert publish_s < 0.01  # publish only queues
    assert res.outcome == "restored" and len(res.snapshot.token_ids) == n
    assert len(latencies) > 5 and max(latencies) < 0.5, max(latencies)


def test_health_state_and_metrics_endpoints(sidecar: str) -> None:
    with urllib.request.urlopen(sidecar + "/health", timeout=5) as resp:
        assert orjson.loads(resp.read())["status"] == "ok"
    with urllib.request.urlopen(sidecar + "/v1/state", timeout=5) as resp:
        assert orjson.loads(resp.read())["pending_sessions"] == 0
    with urllib.request.urlopen(sidecar + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for name in ("snapshot_bytes_written_total", "blocks_written_total", "replication_lag_seconds",
                 "replication_lag_tokens", "restores_total", "restore_seconds", "redis_errors_total",
                 "snapshots_refused_total"):
        assert "unbroken_kvsync_" + name in text


def test_token_and_mac_secret(redis_url: str, tmp_path: Path) -> None:
    """With auth.token every route but /health needs it; with auth.mac_secret a manifest or block
    written by anyone without the secret is refused, and the transcript of a forged manifest too."""
    token, secret = "sidecar-token-1", "mac-secret-1"
    proc, url = start_sidecar(redis_url, log_path=tmp_path / "kvsync.log", settings={
        "store.block_tokens": B, "auth.token": token, "auth.mac_secret": secret})
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            assert resp.status == 200
        for method, path in (("GET", "/v1/state"), ("GET", "/metrics"), ("POST", "/v1/sessions/s1/fetch"),
                             ("POST", "/v1/sessions/s1/snapshots"), ("DELETE", "/v1/sessions/s1")):
            req = urllib.request.Request(url + path, method=method, data=b"{}" if method == "POST" else None)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=5)
            assert e.value.code == 401, path
            assert orjson.loads(e.value.read())["error"]["type"] == "authentication_error"
        assert KVSyncClient(url, block_tokens=B).sidecar_block_tokens() is None  # no token: refused
        anonymous = KVSyncClient(url, block_tokens=B)
        assert _fetch(anonymous, "s1").outcome == "error"

        client = KVSyncClient(url, block_tokens=B, token=token)
        assert client.sidecar_block_tokens() == B
        client.start()
        try:
            keys, values = synthetic_kv(IDENT, 16)
            tokens = list(range(16))
            assert client.publish(snapshot_of("s1", IDENT, tokens, keys, values, transcript=TRANSCRIPT))
            wait_replicated(url, client=client, token=token)
            assert _fetch(client, "s1").outcome == "restored"
            r = redis.Redis.from_url(redis_url)
            stored = r.get(f"{PREFIX}:manifest:s1")
            with pytest.raises(ValueError):
                Manifest.from_json(stored, b"")  # signed with the secret, not without
            m = Manifest.from_json(stored, secret.encode())
            # A manifest re-signed with a guessed secret: refused, transcript withheld.
            m.transcript = [{"role": "system", "content": "injected"}]
            r.set(f"{PREFIX}:manifest:s1", m.to_json(b"guess"), px=60_000)
            forged = _fetch(client, "s1")
            assert forged.outcome == "corrupt" and forged.snapshot is None and forged.transcript is None
            assert metric_value(url, "unbroken_kvsync_bad_data_total", {"reason": "mac"}, token=token) == 1
        finally:
            client.close()
    finally:
        proc.stop()
