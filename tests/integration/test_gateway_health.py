"""Failure detection: heartbeats take crashed and hung replicas out of rotation fast; the breaker
trips on 5xx but never on a client's 4xx; drained replicas take no new work."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.breaker import BreakerState
from gateway.config import GatewayConfig
from gateway.replicaset import ReplicaState
from gateway.testing import RunningGateway
from loadtest.mock_replica import MockKnobs, MockReplica
from unbroken.procs import ManagedProcess, free_port

pytestmark = pytest.mark.asyncio
CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def config(urls: list[str], **sections: Any) -> GatewayConfig:
    data: dict[str, Any] = {"server": {"port": 0}, "replicas": {"urls": urls},
                            "retry": {"backoff_initial_ms": 1, "backoff_max_ms": 2}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return GatewayConfig.model_validate(data)


async def _time_until(pred, timeout_s: float) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            return float("inf")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def test_crashed_replica_leaves_rotation_within_300ms() -> None:
    a = await MockReplica(replica_id="a").start()
    b = await MockReplica(replica_id="b").start()
    gw = await RunningGateway(config([a.url, b.url])).start()
    try:
        await gw.wait_healthy(2)
        rep = gw.gateway.replicas.find("a")
        await a.stop()  # the port now refuses connections
        elapsed = await _time_until(lambda: rep not in gw.gateway.replicas.candidates("qwen"), 2.0)
        assert elapsed < 0.3, f"took {elapsed:.3f}s"
        assert rep.state is ReplicaState.UNHEALTHY
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 200 and r.headers["X-Replica-ID"] == "b"
                    assert r.headers["X-Unbroken-Retries"] == "0"
    finally:
        await gw.stop()
        await b.stop()


async def test_sigstopped_replica_process_leaves_rotation_within_1s(tmp_path: Path) -> None:
    port = free_port()
    proc = ManagedProcess("mock", [sys.executable, "-m", "loadtest.mock_replica", "--port", str(port),
                                   "--replica-id", "stopped"], log_path=tmp_path / "mock.log",
                          ready_url=f"http://127.0.0.1:{port}/health").start()
    other = await MockReplica(replica_id="other").start()
    gw = None
    try:
        proc.wait_ready(30)
        gw = await RunningGateway(config([f"http://127.0.0.1:{port}", other.url])).start()
        await gw.wait_healthy(2)
        rep = gw.gateway.replicas.find("stopped")
        proc.signal(signal.SIGSTOP)
        elapsed = await _time_until(lambda: rep not in gw.gateway.replicas.candidates("qwen"), 3.0)
        assert elapsed < 1.0, f"took {elapsed:.3f}s"
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200 and r.headers["X-Replica-ID"] == "other"
        proc.signal(signal.SIGCONT)
        assert await _time_until(lambda: rep.state is ReplicaState.HEALTHY, 3.0) < 3.0
        status = (await _admin(gw, "GET", "/admin/replicas"))[1]
        assert {r["replica_id"]: r["state"] for r in status["replicas"]} == {"stopped": "healthy", "other": "healthy"}
    finally:
        if gw is not None:
            await gw.stop()
        await other.stop()
        proc.stop()


async def test_work_in_flight_on_a_hung_replica_moves_within_the_detection_bound(tmp_path: Path) -> None:
    """SIGSTOP a replica process while a stream and a non-stream call run on it: both finish on the
    other replica about a second later (when heartbeats declare it unhealthy), long before the
    stream's stall timeout (10 s here) or the non-stream timeout."""
    from gateway.testing import parse_sse, stream_tokens
    from loadtest.mock_replica import expected_completion, prompt_text

    port = free_port()
    proc = ManagedProcess("mock", [sys.executable, "-m", "loadtest.mock_replica", "--port", str(port),
                                   "--replica-id", "hung", "--token-interval-ms", "25"],
                          log_path=tmp_path / "mock.log", ready_url=f"http://127.0.0.1:{port}/health").start()
    other = await MockReplica(MockKnobs(token_interval_ms=1, draining=True), replica_id="other").start()
    gw = None
    try:
        proc.wait_ready(30)
        gw = await RunningGateway(config([f"http://127.0.0.1:{port}", other.url],
                                         replicas={"stall_timeout_s": 10.0, "nonstream_timeout_s": 60.0})).start()
        await gw.wait_healthy(1)
        hung = gw.gateway.replicas.find("hung")
        body = {"model": "qwen", "messages": [{"role": "user", "content": "a long answer"}], "max_tokens": 120}

        async def stream() -> tuple[int, str]:
            async with aiohttp.ClientSession() as s:
                async with s.post(gw.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                    return r.status, await r.text()

        async def whole() -> tuple[int, Any]:
            async with aiohttp.ClientSession() as s:
                async with s.post(gw.url + "/v1/chat/completions", json=body) as r:
                    return r.status, await r.json()

        tasks = [asyncio.create_task(stream()), asyncio.create_task(whole())]
        assert await _time_until(lambda: hung.num_inflight == 2, 5.0) < 5.0
        other.knobs.draining = False  # somewhere to go
        assert await _time_until(lambda: gw.gateway.replicas.find("other").state is ReplicaState.HEALTHY, 3.0) < 3.0
        await asyncio.sleep(0.3)  # the stream is under way
        proc.signal(signal.SIGSTOP)
        t0 = time.monotonic()
        (s_status, s_text), (w_status, w_body) = await asyncio.wait_for(asyncio.gather(*tasks), 20)
        elapsed = time.monotonic() - t0
        assert s_status == 200 and w_status == 200
        want_ids, want_text = expected_completion(prompt_text(body), 120)
        events = parse_sse(s_text)
        assert stream_tokens(events) == (want_ids, want_text)
        assert events[-1] == "[DONE]" and events[-2]["unbroken"]["failovers"] == 1
        assert w_body["choices"][0]["token_ids"] == want_ids
        # Moved when declared unhealthy (~3 missed heartbeats), plus the rest of the generation.
        assert elapsed < 5.0, f"took {elapsed:.2f}s"
        text = gw.gateway.metrics.render().decode()
        assert 'unbroken_gateway_failovers_total{reason="lost"} 1.0' in text
    finally:
        if gw is not None:
            await gw.stop()
        await other.stop()
        proc.signal(signal.SIGCONT)
        proc.stop()


async def _admin(gw: RunningGateway, method: str, path: str, key: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s:
        async with s.request(method, gw.url + path, headers=headers) as r:
            return r.status, await r.json()


async def test_breaker_trips_on_500s_but_not_on_4xx() -> None:
    bad = await MockReplica(MockKnobs(status_override=400), replica_id="bad").start()
    gw = await RunningGateway(config([bad.url], breaker={"failure_threshold": 3, "open_duration_s": 0.3,
                                                         "half_open_successes": 1},
                                     retry={"max_attempts": 1}, replicas={"no_replica_wait_s": 0})).start()
    try:
        await gw.wait_healthy(1)
        rep = gw.gateway.replicas.find("bad")
        async with aiohttp.ClientSession() as s:
            for _ in range(10):
                async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 400
            assert rep.breaker.state is BreakerState.CLOSED
            bad.knobs.status_override = 500
            for _ in range(3):
                async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 500
            assert rep.breaker.state is BreakerState.OPEN
            before = bad.num_requests
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 503  # not sent to the open replica; nothing else can serve
                assert r.headers.get("Retry-After")
            assert bad.num_requests == before
            bad.knobs.status_override = 0
            await asyncio.sleep(0.35)
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:  # the half-open probe
                assert r.status == 200
            assert rep.breaker.state is BreakerState.CLOSED
        metrics = gw.gateway.metrics.render().decode()
        assert 'unbroken_gateway_replica_breaker_trips{replica="bad"} 1.0' in metrics
    finally:
        await gw.stop()
        await bad.stop()


async def test_a_request_with_no_replica_right_now_waits_briefly_for_one() -> None:
    """The only replica's breaker is open: the request waits (no_replica_wait_s) until the breaker
    half-opens and is served, instead of failing at once; with no replica at all it gets 503 after
    the wait."""
    m = await MockReplica(MockKnobs(fail_first_n=3), replica_id="m").start()
    gw = await RunningGateway(config([m.url], breaker={"failure_threshold": 3, "open_duration_s": 0.5},
                                     retry={"max_attempts": 1}, replicas={"no_replica_wait_s": 2.0})).start()
    try:
        await gw.wait_healthy(1)
        rep = gw.gateway.replicas.find("m")
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 500
            assert rep.breaker.state is BreakerState.OPEN
            t0 = time.monotonic()
            async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert r.status == 200 and (await r.text()).endswith("data: [DONE]\n\n")
            assert 0.3 < time.monotonic() - t0 < 1.5
            await m.stop()
            await _time_until(lambda: rep.state is ReplicaState.UNHEALTHY, 2.0)
            t0 = time.monotonic()
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 503 and r.headers.get("Retry-After")
            assert time.monotonic() - t0 >= 1.9
    finally:
        await gw.stop()
        await m.stop()


async def test_admin_drain_stops_new_work_while_running_streams_finish() -> None:
    import hashlib

    a = await MockReplica(MockKnobs(token_interval_ms=20), replica_id="a").start()
    b = await MockReplica(replica_id="b").start()
    cfg = config([a.url, b.url], auth={"admin_key_sha256": hashlib.sha256(b"root").hexdigest()},
                 routing={"policy": "least_load", "session_affinity": False})
    gw = await RunningGateway(cfg).start()
    try:
        await gw.wait_healthy(2)
        async with aiohttp.ClientSession() as s:
            gw.gateway.replicas.find("b").num_inflight += 100  # make sure the stream starts on a
            resp = await s.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 15})
            assert resp.headers["X-Replica-ID"] == "a"
            gw.gateway.replicas.find("b").num_inflight -= 100
            assert (await _admin(gw, "POST", "/admin/replicas/a/drain"))[0] == 401
            assert (await _admin(gw, "POST", "/admin/replicas/a/drain", "nope"))[0] == 403
            assert (await _admin(gw, "POST", "/admin/replicas/zz/drain", "root"))[0] == 404
            status, body = await _admin(gw, "POST", "/admin/replicas/a/drain", "root")
            assert status == 200 and body["state"] == "draining"
            text = await resp.text()
            assert text.rstrip().endswith("data: [DONE]") and "error" not in text
            resp.release()
            for _ in range(6):
                async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.headers["X-Replica-ID"] == "b"
            await asyncio.sleep(0.3)  # heartbeats do not undo an admin drain
            assert gw.gateway.replicas.find("a").state is ReplicaState.DRAINING
    finally:
        await gw.stop()
        await a.stop()
        await b.stop()
