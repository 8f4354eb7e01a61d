"""The gateway's own defences, against mock replicas and a real redis-server: sessions scoped to
their key, per-key leases (in-flight cap, tokens reserved up front, critical only when allowed),
bodies read whole with a timeout, over-context prompts answered at once, a registry in Redis that
is not trusted, and no public bind without auth."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from gateway.auth import ApiKey, RateLimiter
from gateway.config import GatewayConfig, load_gateway_config
from gateway.registry import RegistryDiscovery
from gateway.replicaset import ReplicaSet, ReplicaSource
from gateway.testing import RunningGateway
from loadtest.mock_replica import MockKnobs, MockReplica
from unbroken.config import ConfigError

CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def config(urls: list[str], **sections: Any) -> GatewayConfig:
    data: dict[str, Any] = {"server": {"port": 0}, "replicas": {"urls": urls},
                            "retry": {"backoff_initial_ms": 1, "backoff_max_ms": 2}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return GatewayConfig.model_validate(data)


def keyed(name: str, secret: str, **limits: Any) -> dict[str, Any]:
    return {"name": name, "sha256": hashlib.sha256(secret.encode()).hexdigest(), **limits}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.mark.asyncio
async def test_session_ids_are_scoped_to_the_key_and_checked() -> None:
    m = await MockReplica(replica_id="m").start()
    auth = {"enabled": True, "session_secret": "s3cret", "session_id_max_chars": 32,
            "api_keys": [keyed("a", "key-a"), keyed("b", "key-b")]}
    gw = await RunningGateway(config([m.url], auth=auth)).start()
    try:
        await gw.wait_healthy(1)
        url = gw.url + "/v1/chat/completions"
        seen: dict[str, str | None] = {}
        async with aiohttp.ClientSession() as s:
            for who in ("a", "b"):
                async with s.post(url, json=CHAT, headers={**bearer(f"key-{who}"), "X-Session-ID": "conv-1"}) as r:
                    assert r.status == 200
                seen[who] = m.last_session_id
            async with s.post(url, json=CHAT, headers={**bearer("key-a"), "X-Session-ID": "conv-1"}) as r:
                assert r.status == 200 and m.last_session_id == seen["a"]  # stable for one key
            for bad in ("x" * 33, "conv 1", "conv/1", "é"):
                n = m.num_requests
                async with s.post(url, json=CHAT, headers={**bearer("key-a"), "X-Session-ID": bad}) as r:
                    body = await r.json()
                    assert r.status == 400 and body["error"]["param"] == "X-Session-ID", (bad, body)
                assert m.num_requests == n
        assert seen["a"] and seen["b"] and seen["a"] != seen["b"]
        assert "conv-1" not in (seen["a"], seen["b"])  # the replica never sees the client's own id
    finally:
        await gw.stop()
        await m.stop()


@pytest.mark.asyncio
async def test_per_key_in_flight_cap_and_critical_only_when_allowed() -> None:
    m = await MockReplica(MockKnobs(response_delay_ms=400), replica_id="m").start()
    auth = {"enabled": True, "api_keys": [keyed("a", "key-a", max_concurrent_requests=2),
                                          keyed("vip", "key-vip", allow_critical=True)]}
    gw = await RunningGateway(config([m.url], auth=auth)).start()
    try:
        await gw.wait_healthy(1)
        url = gw.url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as s:
            async def one(secret: str, **headers: str) -> tuple[int, Any]:
                async with s.post(url, json=CHAT, headers={**bearer(secret), **headers}) as r:
                    return r.status, await r.json()

            results = await asyncio.gather(*(one("key-a") for _ in range(3)))
            statuses = sorted(st for st, _ in results)
            assert statuses == [200, 200, 429], results
            assert [b for st, b in results if st == 429][0]["error"]["code"] == "concurrent_requests"
            assert gw.gateway.limiter.num_inflight(gw.gateway.auth.authenticate("Bearer key-a")) == 0  # released
            assert (await one("key-a"))[0] == 200  # the slots came back
            status, body = await one("key-a", **{"X-Priority": "critical"})
            assert status == 403 and body["error"]["param"] == "X-Priority"
            assert (await one("key-vip", **{"X-Priority": "critical"}))[0] == 200
    finally:
        await gw.stop()
        await m.stop()


def test_tokens_are_reserved_up_front_and_refunded() -> None:
    now = [600.0]
    lim = RateLimiter(clock=lambda: now[0])
    key = ApiKey("k", tokens_per_minute=100)
    a = lim.acquire(key, 60)  # reserved: 60 of 100
    with pytest.raises(Exception) as e:
        lim.acquire(key, 50)  # 60 + 50 > 100, refused before it runs
    assert getattr(e.value, "code", "") == "tokens_per_minute"
    a.release(10)  # it used 10: 50 come back
    b = lim.acquire(key, 50)
    b.release()  # ended without a count: the reservation is the charge
    with pytest.raises(Exception):
        lim.acquire(key, 41)
    lim.acquire(key, 40).release(40)
    now[0] += 60  # a new minute
    lim.acquire(key, 1000).release(5)  # capped at the limit, and allowed in an empty window
    assert lim.num_inflight(key) == 0


@pytest.mark.asyncio
async def test_bodies_are_read_whole_with_a_timeout_and_a_limit() -> None:
    m = await MockReplica(replica_id="m").start()
    gw = await RunningGateway(config([m.url], server={"max_body_bytes": 1024 * 1024,
                                                      "body_read_timeout_s": 0.5})).start()
    try:
        await gw.wait_healthy(1)
        url = gw.url + "/v1/chat/completions"
        # valid JSON of 600 KB, its bulk before the last field (a read cut short is not valid JSON)
        big = b'{"model": "qwen",' + b" " * 600_000 + orjson.dumps(CHAT)[1:]
        async with aiohttp.ClientSession() as s:
            async def chunks() -> Any:  # sent in pieces, so the server sees it arrive over several reads
                for i in range(0, len(big), 64 * 1024):
                    yield big[i:i + 64 * 1024]
                    await asyncio.sleep(0.001)

            async with s.post(url, data=big, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
            async with s.post(url, data=chunks(), headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
            async with s.post(url, data=big + b" " * 500_000, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 413 and (await r.json())["error"]["code"] == "payload_too_large"
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        t0 = time.monotonic()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\":")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert time.monotonic() - t0 < 5
        writer.close()
    finally:
        await gw.stop()
        await m.stop()


@pytest.mark.asyncio
async def test_prompt_over_the_context_is_answered_400_at_once() -> None:
    m = await MockReplica(replica_id="m").start()  # reports max_model_len 4096
    gw = await RunningGateway(config([m.url])).start()
    try:
        await gw.wait_healthy(1)
        body = {**CHAT, "messages": [{"role": "user", "content": "word " * 80_000}]}  # 400 KB
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            async with s.post(gw.url + "/v1/chat/completions", json=body) as r:
                data = await r.json()
            took = time.monotonic() - t0
            print(f"400 KB prompt answered {r.status} in {took:.3f}s")
            assert r.status == 400 and data["error"]["code"] == "context_length_exceeded", data
            assert took < 3.0
            async with s.post(gw.url + "/v1/completions", json={"model": "qwen", "prompt": "x" * 70_000}) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"
        assert m.num_requests == 0
    finally:
        await gw.stop()
        await m.stop()


def test_public_bind_without_auth_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="allow_public_without_auth"):
        load_gateway_config(None, {"server.host": "0.0.0.0"}, environ={})
    load_gateway_config(None, {"server.host": "0.0.0.0", "server.allow_public_without_auth": True}, environ={})
    load_gateway_config(None, {"server.host": "::1"}, environ={})
    load_gateway_config(None, {"server.host": "10.1.2.3", "auth.enabled": True,
                               "auth.api_keys": [keyed("a", "k")]}, environ={})


@pytest.mark.asyncio
async def test_registry_entries_are_checked_one_by_one(redis_url: str) -> None:
    import redis.asyncio as aioredis

    m = await MockReplica(replica_id="good").start()
    sync = redis.Redis.from_url(redis_url)
    entry = {"replica_id": "good", "url": m.url, "model": "qwen", "adapters": ["sql"]}
    sync.set("a:replica:good", orjson.dumps(entry))
    sync.set("a:replica:bad-adapters", orjson.dumps({**entry, "replica_id": "x", "url": "http://127.0.0.1:1",
                                                      "adapters": 5}))
    sync.set("a:replica:elsewhere", orjson.dumps({**entry, "replica_id": "y", "url": "http://10.9.9.9:80"}))
    sync.set("a:replica:not-json", b"{nope")
    sync.set("a:replica:scheme", orjson.dumps({**entry, "url": "file:///etc/passwd"}))
    sync.set("b:replica:other", orjson.dumps({**entry, "replica_id": "other", "url": "http://127.0.0.1:2"}))
    client = aioredis.from_url(redis_url)
    try:
        reps_a, reps_b = ReplicaSet(GatewayConfig().breaker), ReplicaSet(GatewayConfig().breaker)
        da = RegistryDiscovery(reps_a, client, "a:", 1.0, 1.0, on_drain=lambda _id: None)
        db = RegistryDiscovery(reps_b, client, "b:", 1.0, 1.0, on_drain=lambda _id: None)
        await da.sync_once()
        await db.sync_once()
        assert [r.url for r in reps_a] == [m.url] and da.num_rejected == 4
        assert reps_a.find("good").source is ReplicaSource.REGISTRY
        assert sorted(reps_a.find("good").models) == ["qwen", "qwen:sql"]
        assert [r.replica_id for r in reps_b] == ["other"] and db.num_rejected == 0  # two deployments, one Redis
        wide = RegistryDiscovery(ReplicaSet(GatewayConfig().breaker), client, "a:", 1.0, 1.0,
                                 on_drain=lambda _id: None, allowed_hosts=["10.0.0.0/8", "127.0.0.1"])
        await wide.sync_once()
        assert sorted(r.replica_id for r in wide.replicas) == ["good", "y"]
    finally:
        await client.aclose()
        sync.close()
        await m.stop()
