"""Resumable streams and repeated non-stream requests across two gateways sharing one Redis (the
gateways in-process, mock replicas, a real redis-server): every event has an id, a reconnect with
``Last-Event-ID`` to the other gateway continues exactly, refusals are clear 4xx, a repeated
non-stream request is generated once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.config import GatewayConfig, StreamsSection, sha256_hex
from gateway.metrics import GatewayMetrics
from gateway.rediswire import redis_client
from gateway.streamstate import StreamRecord, StreamStateStore, parse_record
from gateway.testing import RunningGateway, parse_sse, stream_tokens
from loadtest.mock_replica import MockKnobs, MockReplica, expected_completion, prompt_text
from unbroken.procs import free_port, start_redis

pytestmark = pytest.mark.asyncio

KEYS = {"alice": "sk-alice", "bob": "sk-bob"}
ADMIN_KEY = "sk-admin"
CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 40,
        "stream": True, "temperature": 0}


def _config(urls: list[str], redis_url: str) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "server": {"port": 0}, "replicas": {"urls": urls, "stall_timeout_s": 0.5},
        "routing": {"session_affinity": False, "policy": "round_robin"},
        "redis": {"url": redis_url, "key_prefix": "t:"},
        "streams": {"state_write_interval_ms": 20},
        "auth": {"enabled": True, "api_keys": [{"name": n, "sha256": sha256_hex(k)} for n, k in KEYS.items()],
                 "admin_key_sha256": sha256_hex(ADMIN_KEY)},
    })


@pytest_asyncio.fixture
async def stack(redis_url: str) -> AsyncIterator[tuple[list[MockReplica], list[RunningGateway]]]:
    ms = [await MockReplica(MockKnobs(token_interval_ms=5), replica_id=f"m{i}").start() for i in range(2)]
    gws = [await RunningGateway(_config([m.url for m in ms], redis_url)).start() for _ in range(2)]
    for g in gws:
        await g.wait_healthy(2)
    try:
        yield ms, gws
    finally:
        for g in gws:
            await g.stop()
        for m in ms:
            await m.stop()


def _headers(rid: str, key: str = "alice", last: str | None = None) -> dict[str, str]:
    h = {"Authorization": f"Bearer {KEYS[key]}", "X-Request-ID": rid}
    if last is not None:
        h["Last-Event-ID"] = last
    return h


def _blocks(text: str) -> list[tuple[str | None, str]]:
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        eid = data = None
        for line in block.split("\n"):
            if line.startswith("id:"):
                eid = line[3:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
        assert data is not None
        out.append((eid, data))
    return out


async def _read_until_tokens(resp: aiohttp.ClientResponse, num_tokens: int) -> str:
    """Read whole events until ``num_tokens`` tokens arrived; returns the text read."""
    buf = ""
    while True:
        chunk = await resp.content.readany()
        assert chunk, "the stream ended early"
        buf += chunk.decode()
        whole = buf[:buf.rfind("\n\n") + 2]
        ids, _ = stream_tokens(parse_sse(whole))
        if len(ids) >= num_tokens:
            return whole


async def test_every_event_has_an_id_and_the_other_gateway_continues_exactly(stack: Any) -> None:
    ms, (a, b) = stack
    want_ids, want_text = expected_completion(prompt_text(CHAT), 40)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(a.url + "/v1/chat/completions", json=CHAT, headers=_headers("r-1"))
        assert resp.status == 200
        first = await _read_until_tokens(resp, 10)
        resp.close()  # the connection is gone
        blocks = _blocks(first)
        assert all(eid is not None and eid.startswith("r-1:") for eid, _ in blocks)
        assert blocks[0][0] == "r-1:0"  # the role chunk
        last = blocks[-1][0]
        assert last is not None
        # the other gateway has never seen the stream: it reads the state from Redis
        async with s.post(b.url + "/v1/chat/completions", json=CHAT, headers=_headers("r-1", last=last)) as r2:
            assert r2.status == 200, await r2.text()
            rest = await r2.text()
    events = parse_sse(first) + parse_sse(rest)
    ids, text = stream_tokens(events)
    assert ids == want_ids and text == want_text
    chunks = [e for e in events if isinstance(e, dict)]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert sum(1 for c in chunks for ch in c["choices"] if "role" in (ch.get("delta") or {})) == 1
    assert events[-1] == "[DONE]"
    rest_ids = [eid for eid, _ in _blocks(rest)]
    assert rest_ids[0] == f"r-1:{int(last.split(':')[1]) + 1}"  # exactly the next event
    assert b.gateway.metrics.stream_resumes.labels("redis")._value.get() == 1


async def _streams_running(s: aiohttp.ClientSession, url: str) -> float:
    async with s.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        assert r.status == 200, await r.text()
        for line in (await r.text()).splitlines():
            if line.startswith("unbroken_gateway_streams_running "):
                return float(line.rpartition(" ")[2])
    raise AssertionError("no unbroken_gateway_streams_running gauge")


async def test_the_streams_running_gauge_counts_the_streams_relayed_now(stack: Any) -> None:
    """What the chaos runner's kill_gateway waits on: 1 while a stream runs here, 0 once it ended."""
    ms, (a, b) = stack
    async with aiohttp.ClientSession() as s:
        assert await _streams_running(s, a.url) == 0
        async with s.post(a.url + "/v1/chat/completions", json=CHAT, headers=_headers("g-1")) as resp:
            assert resp.status == 200
            await _read_until_tokens(resp, 3)
            assert await _streams_running(s, a.url) == 1
            assert await _streams_running(s, b.url) == 0
            await resp.read()
        assert await _streams_running(s, a.url) == 0


async def test_resume_after_the_end_chunk_sends_only_what_is_missing(stack: Any) -> None:
    ms, (a, b) = stack
    async with aiohttp.ClientSession() as s:
        async with s.post(a.url + "/v1/chat/completions", json=CHAT, headers=_headers("r-2")) as r:
            full = _blocks(await r.text())
        end_id = full[-2][0]  # the finish chunk (no token): "<rid>:<N>.1"
        assert end_id == "r-2:40.1" and full[-1] == ("r-2:40.2", "[DONE]")
        await _wait_written(b, "r-2", 1)  # (a finished stream's last tokens are not written: regenerated)
        async with s.post(b.url + "/v1/chat/completions", json=CHAT, headers=_headers("r-2", last=end_id)) as r:
            assert r.status == 200
            assert _blocks(await r.text()) == [("r-2:40.2", "[DONE]")]


async def _wait_written(gw: RunningGateway, rid: str, num_tokens: int) -> StreamRecord:
    r = aioredis.from_url(gw.config.redis.url)
    try:
        deadline = time.monotonic() + 10
        while True:
            blob, body = await r.mget(f"t:stream:{rid}", f"t:stream-body:{rid}")
            if blob:
                rec = parse_record(rid, blob, body, 1 << 20, 1 << 16)
                if len(rec.token_ids) >= num_tokens:
                    return rec
            assert time.monotonic() < deadline, "the stream state never reached Redis"
            await asyncio.sleep(0.02)
    finally:
        await r.aclose()


@pytest.mark.parametrize("case", ["unknown", "other_key", "other_body", "malformed", "other_request"])
async def test_refused_reconnects_are_clear_4xx(stack: Any, case: str) -> None:
    ms, (a, b) = stack
    async with aiohttp.ClientSession() as s:
        async with s.post(a.url + "/v1/chat/completions", json=CHAT, headers=_headers("r-3")) as r:
            await r.text()
        await _wait_written(a, "r-3", 1)
        body, headers, want = CHAT, _headers("r-3", last="r-3:5"), 404
        if case == "unknown":
            headers = _headers("nope", last="nope:5")
        elif case == "other_key":
            headers = _headers("r-3", key="bob", last="r-3:5")
        elif case == "other_body":
            body, want = {**CHAT, "max_tokens": 41}, 409
        elif case == "malformed":
            headers, want = _headers("r-3", last="r-3:x"), 400
        elif case == "other_request":
            headers, want = _headers("r-4", last="r-3:5"), 400
        n_before = sum(m.num_requests for m in ms)
        async with s.post(b.url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == want
            err = (await r.json())["error"]
            assert err["message"] and err["type"] == "invalid_request_error"
        assert sum(m.num_requests for m in ms) == n_before  # never a silent restart


async def test_repeated_nonstream_request_is_generated_once(stack: Any) -> None:
    ms, (a, b) = stack
    body = {**CHAT, "stream": False}
    async with aiohttp.ClientSession() as s:
        async with s.post(a.url + "/v1/chat/completions", json=body, headers=_headers("n-1")) as r:
            assert r.status == 200
            first = await r.json()
        n = sum(m.num_requests for m in ms)
        async with s.post(b.url + "/v1/chat/completions", json=body, headers=_headers("n-1")) as r:
            assert r.status == 200 and r.headers["X-Unbroken-Replayed"] == "redis"
            assert await r.json() == first
        async with s.post(a.url + "/v1/chat/completions", json=body, headers=_headers("n-1")) as r:
            assert r.status == 200 and r.headers["X-Unbroken-Replayed"] == "local"
        assert sum(m.num_requests for m in ms) == n
        async with s.post(b.url + "/v1/chat/completions", json={**body, "max_tokens": 3},
                          headers=_headers("n-1")) as r:
            assert r.status == 409
        # concurrent repeats on two gateways: one generation
        rs = await asyncio.gather(*(s.post(g.url + "/v1/chat/completions", json=body, headers=_headers("n-2"))
                                    for g in (a, b, a)))
        answers = [await r.json() for r in rs]
        assert all(r.status == 200 for r in rs) and answers[0] == answers[1] == answers[2]
        assert sum(m.num_requests for m in ms) == n + 1


async def test_redis_down_keeps_streams_resumable_on_their_gateway(redis_proc: Any) -> None:
    proc, url = redis_proc
    ms = [await MockReplica(MockKnobs(token_interval_ms=5), replica_id="m0").start()]
    a = await RunningGateway(_config([ms[0].url], url)).start()
    try:
        await a.wait_healthy(1)
        proc.kill()
        async with aiohttp.ClientSession() as s:
            resp = await s.post(a.url + "/v1/chat/completions", json=CHAT, headers=_headers("r-9"))
            first = await _read_until_tokens(resp, 5)
            resp.close()
            last = _blocks(first)[-1][0]
            async with s.post(a.url + "/v1/chat/completions", json=CHAT, headers=_headers("r-9", last=last)) as r:
                assert r.status == 200
                rest = await r.text()
        ids, _ = stream_tokens(parse_sse(first) + parse_sse(rest))
        assert ids == expected_completion(prompt_text(CHAT), 40)[0]
        deadline = time.monotonic() + 10
        while a.gateway.metrics.stream_state_writes.labels("error")._value.get() == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await a.stop()
        await ms[0].stop()


async def test_a_dead_gateways_claim_lapses(stack: Any) -> None:
    """A gateway killed while generating leaves its claim on the id; a repeat on another gateway
    waits for it only until it lapses (its owner no longer renews it), then generates."""
    from gateway.idempotency import CLAIM_TTL_S

    ms, (a, b) = stack
    r = aioredis.from_url(b.config.redis.url)
    await r.set("t:answer:n-dead", b"Pdeadgateway", px=int(CLAIM_TTL_S * 1000))
    await r.aclose()
    body = {**CHAT, "stream": False}
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        async with s.post(b.url + "/v1/chat/completions", json=body, headers=_headers("n-dead")) as resp:
            assert resp.status == 200
            assert "X-Unbroken-Replayed" not in resp.headers
    assert CLAIM_TTL_S * 0.5 < time.monotonic() - t0 < CLAIM_TTL_S + 5


async def test_a_live_claim_is_renewed_while_generating(stack: Any) -> None:
    """A generation longer than the claim's life keeps its claim: a repeat waits for the answer."""
    from gateway.idempotency import CLAIM_TTL_S

    ms, (a, b) = stack
    for m in ms:
        m.knobs.token_interval_ms = int(CLAIM_TTL_S * 1000 * 1.5 / 40)  # 40 tokens: 1.5 claim lives
    body = {**CHAT, "stream": False}
    async with aiohttp.ClientSession() as s:
        first = asyncio.ensure_future(s.post(a.url + "/v1/chat/completions", json=body, headers=_headers("n-long")))
        await asyncio.sleep(0.3)
        n = sum(m.num_requests for m in ms)
        async with s.post(b.url + "/v1/chat/completions", json=body, headers=_headers("n-long")) as resp:
            assert resp.status == 200 and resp.headers["X-Unbroken-Replayed"] == "redis"
            second = await resp.json()
        r1 = await first
        assert await r1.json() == second
        assert sum(m.num_requests for m in ms) == n  # generated once


async def test_a_reconnect_without_x_request_id_names_its_stream_by_the_event_id(stack: Any) -> None:
    ms, (a, b) = stack
    async with aiohttp.ClientSession() as s:
        resp = await s.post(a.url + "/v1/chat/completions", json=CHAT, headers=_headers("r-5"))
        first = await _read_until_tokens(resp, 5)
        resp.close()
        last = _blocks(first)[-1][0]
        assert last is not None
        headers = {"Authorization": f"Bearer {KEYS['alice']}", "Last-Event-ID": last}
        async with s.post(a.url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
            assert r.status == 200 and r.headers["X-Request-ID"] == "r-5"
            rest = await r.text()
        ids, _ = stream_tokens(parse_sse(first) + parse_sse(rest))
        assert ids == expected_completion(prompt_text(CHAT), 40)[0]
        # a non-stream request cannot be resumed: a 4xx, nothing generated
        n = sum(m.num_requests for m in ms)
        async with s.post(a.url + "/v1/chat/completions", json={**CHAT, "stream": False}, headers=headers) as r:
            assert r.status == 400
        assert sum(m.num_requests for m in ms) == n


async def test_a_stream_is_in_redis_as_it_opens_not_an_interval_later(redis_url: str) -> None:
    """A gateway killed a few milliseconds after a stream's first event must leave its state behind:
    the open is written at once (here the interval is a minute, so only the open can write it)."""
    client = aioredis.from_url(redis_url)
    store = StreamStateStore(StreamsSection(state_write_interval_ms=60_000), "t:", GatewayMetrics(),
                             1 << 20, 2.0)
    store.attach_redis(client, redis_url)
    store.start()
    try:
        rec = StreamRecord(request_id="r1", route="/v1/chat/completions", principal="k", body_sha256="s",
                           body_json=orjson.dumps({"model": "m", "temperature": 0}), stream_id="chatcmpl-1", created=7, model="m",
                           token_ids=[5])
        store.open(rec)
        short = StreamRecord(request_id="r2", route="/v1/completions", principal="k", body_sha256="s",
                             body_json=orjson.dumps({"model": "m"}))
        store.open(short)
        store.close(short, finished=True)  # done before the owner task ran: needs no write
        blob = None
        for _ in range(200):
            blob = await client.get("t:stream:r1")
            if blob is not None:
                break
            await asyncio.sleep(0.01)
        got = parse_record("r1", blob, None, 1 << 20, 1000)
        assert (got.stream_id, got.created, got.model, got.token_ids) == ("chatcmpl-1", 7, "m", [5])
        assert await client.get("t:stream:r2") is None
    finally:
        await store.stop()
        await client.aclose()



async def test_without_the_write_behind_a_stream_resumes_on_its_gateway_only(redis_url: str) -> None:
    """``state_write_behind: false``: nothing per stream reaches Redis; the stream resumes exactly on
    the gateway that relayed it, and another gateway answers its reconnect with a clear 404."""
    m = await MockReplica(MockKnobs(token_interval_ms=5), replica_id="m0").start()
    cfg = _config([m.url], redis_url)
    local_only = cfg.model_copy(update={"streams": cfg.streams.model_copy(update={"state_write_behind": False})})
    a = await RunningGateway(local_only).start()
    b = await RunningGateway(cfg).start()
    client = aioredis.from_url(redis_url)
    try:
        await a.wait_healthy(1)
        await b.wait_healthy(1)
        async with aiohttp.ClientSession() as s:
            resp = await s.post(a.url + "/v1/chat/completions", json=CHAT, headers=_headers("w-1"))
            assert resp.status == 200
            first = await _read_until_tokens(resp, 10)
            resp.close()
            last = _blocks(first)[-1][0]
            async with s.post(b.url + "/v1/chat/completions", json=CHAT, headers=_headers("w-1", last=last)) as r:
                assert r.status == 404, await r.text()
                assert (await r.json())["error"]["code"] == "stream_not_found"
            async with s.post(a.url + "/v1/chat/completions", json=CHAT, headers=_headers("w-1", last=last)) as r:
                assert r.status == 200, await r.text()
                rest = await r.text()
        ids, _ = stream_tokens(parse_sse(first) + parse_sse(rest))
        assert ids == expected_completion(prompt_text(CHAT), 40)[0]
        assert await client.keys("t:stream*") == []
        assert a.gateway.metrics.stream_state_writes.labels("ok")._value.get() == 0
    finally:
        await client.aclose()
        await a.stop()
        await b.stop()
        await m.stop()


async def test_without_the_write_at_open_a_young_stream_waits_for_its_interval(redis_url: str) -> None:
    """``state_write_on_open: false``: an opened stream is left to the next interval (a minute here),
    while a stream its client left is still written at once."""
    client = aioredis.from_url(redis_url)
    store = StreamStateStore(StreamsSection(state_write_interval_ms=60_000, state_write_on_open=False), "t:",
                             GatewayMetrics(), 1 << 20, 2.0)
    store.attach_redis(client, redis_url)
    store.start()
    try:
        young = StreamRecord(request_id="y1", route="/v1/completions", principal="k", body_sha256="s",
                             body_json=orjson.dumps({"model": "m"}), token_ids=[1])
        store.open(young)
        left = StreamRecord(request_id="y2", route="/v1/completions", principal="k", body_sha256="s",
                            body_json=orjson.dumps({"model": "m"}), token_ids=[2])
        store.open(left)
        store.close(left, finished=False)
        for _ in range(200):
            if await client.get("t:stream:y2") is not None:
                break
            await asyncio.sleep(0.01)
        assert await client.get("t:stream:y2") is not None
        assert await client.get("t:stream:y1") is None
        assert store.local("y1") is young  # resumable here all the same
    finally:
        await store.stop()
        await client.aclose()


async def test_a_lookup_after_redis_restarted_takes_a_fresh_connection(tmp_path: Path) -> None:
    """Redis restarted behind the gateway's pool (the redis_loss chaos, then a gateway kill): the first
    read on a pooled connection meets 'Connection closed by server'; it is sent once more on a
    fresh connection (the gateway's client, ``redis_client``) instead of answering the resume 404."""
    port = free_port()
    proc, url = start_redis(port=port, log_path=tmp_path / "redis-1.log")
    client = redis_client(url, 2.0)
    store = StreamStateStore(StreamsSection(), "t:", GatewayMetrics(), 1 << 20, 2.0)
    store.attach_redis(client, url)
    try:
        await asyncio.gather(*(client.get("warm") for _ in range(4)))  # connections into the pool
        proc.kill()
        proc, _ = start_redis(port=port, log_path=tmp_path / "redis-2.log")
        rec = StreamRecord(request_id="r9", route="/v1/completions", principal="k", body_sha256="s",
                           body_json=orjson.dumps({"model": "m"}), token_ids=[4, 2])
        await aioredis.from_url(url).set("t:stream:r9", rec.state_blob(2, rec.body_json))
        got, source = await store.lookup("r9")
        assert source == "redis" and got is not None and got.token_ids == [4, 2]
    finally:
        await store.stop()
        await client.aclose()
        proc.stop()


async def test_one_bad_stream_does_not_stop_the_others_writes(redis_url: str) -> None:
    """A stream whose token ids no uint32 holds (a replica's garbage) is counted and left out; the
    streams written with it in the same turn of the loop reach Redis."""
    client = aioredis.from_url(redis_url)
    metrics = GatewayMetrics()
    store = StreamStateStore(StreamsSection(state_write_interval_ms=60_000), "t:", metrics, 1 << 20, 2.0)
    store.attach_redis(client, redis_url)
    store.start()
    try:
        bad = StreamRecord(request_id="bad", route="/v1/completions", principal="k", body_sha256="s",
                           body_json=b"{}", token_ids=[-1])
        good = StreamRecord(request_id="good", route="/v1/completions", principal="k", body_sha256="s",
                            body_json=b"{}", token_ids=[3])
        for _ in range(200):  # once the writer's connection is up, both are sent in one turn
            if store._wire is not None and store._wire.connected:
                break
            await asyncio.sleep(0.01)
        store.open(bad)
        store.open(good)
        for _ in range(200):
            if await client.get("t:stream:good") is not None:
                break
            await asyncio.sleep(0.01)
        assert parse_record("good", await client.get("t:stream:good"), None, 1 << 20, 10).token_ids == [3]
        assert await client.get("t:stream:bad") is None
        assert metrics.stream_state_writes.labels("error")._value.get() == 1
        bad.token_ids.append(4)
        store._tick()  # it grew, but it is not tried (nor logged) at every interval again
        assert metrics.stream_state_writes.labels("error")._value.get() == 1
    finally:
        await store.stop()
        await client.aclose()


async def test_a_redis_that_stops_answering_is_left_and_reconnected(tmp_path: Path) -> None:
    """Writes unanswered for ``op_timeout_s`` close the connection (counted as errors, the streams
    stay resumable here) and the writer connects again: the relay never waited on any of it."""
    connections = 0

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await reader.read(65536):
            pass

    port = free_port()
    server = await asyncio.start_server(never_answer, "127.0.0.1", port)
    url = f"redis://127.0.0.1:{port}/0"
    metrics = GatewayMetrics()
    store = StreamStateStore(StreamsSection(state_write_interval_ms=50), "t:", metrics, 1 << 20, 0.3)
    store.attach_redis(aioredis.from_url(url), url)
    store.start()
    try:
        rec = StreamRecord(request_id="r", route="/v1/completions", principal="k", body_sha256="s",
                           body_json=b"{}", token_ids=[1])
        store.open(rec)
        deadline = time.monotonic() + 10
        while metrics.stream_state_writes.labels("error")._value.get() == 0 or connections < 2:
            assert time.monotonic() < deadline
            rec.token_ids.append(2)  # keeps growing: written every interval
            await asyncio.sleep(0.05)
        assert store.local("r") is rec
    finally:
        await store.stop()
        server.close()
