"""The gateway's edge: bad input answered by the gateway itself (nothing forwarded), auth and
per-key limits, the retry budget, shedding with Retry-After, slow clients, metrics exposition."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import GatewayConfig
from gateway.testing import RunningGateway
from loadtest.mock_replica import MockKnobs, MockReplica

pytestmark = pytest.mark.asyncio
CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def config(urls: list[str], **sections: Any) -> GatewayConfig:
    data: dict[str, Any] = {"server": {"port": 0, "max_body_bytes": 4096}, "replicas": {"urls": urls},
                            "retry": {"backoff_initial_ms": 1, "backoff_max_ms": 2}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return GatewayConfig.model_validate(data)


async def test_bad_input_is_answered_by_the_gateway_and_never_forwarded() -> None:
    m = await MockReplica(replica_id="m").start()
    gw = await RunningGateway(config([m.url])).start()
    try:
        await gw.wait_healthy(1)
        url = gw.url + "/v1/chat/completions"
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({"data": b"{not json"}, 400, "invalid_request"),
            ({"data": b"[1, 2]"}, 400, "invalid_request"),
            ({"data": b""}, 400, "invalid_request"),
            ({"data": b"x" * 5000}, 413, "payload_too_large"),
            ({"json": {**CHAT, "max_tokens": "many"}}, 422, "invalid_value"),
            ({"json": {**CHAT, "messages": [{"role": "user"}], "temperature": -1}}, 422, "invalid_value"),
            ({"json": {**CHAT, "model": "gpt-9"}}, 404, "model_not_found"),
            ({"json": {"model": "qwen"}}, 400, "invalid_request"),
        ]
        async with aiohttp.ClientSession() as s:
            for kwargs, status, code in cases:
                async with s.post(url, **kwargs) as r:
                    body = await r.json()
                    assert r.status == status, (kwargs, body)
                    assert body["error"]["code"] == code and body["error"]["message"]
                    assert set(body["error"]) == {"message", "type", "param", "code"}
            async with s.get(gw.url + "/v1/nothing") as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        assert m.num_requests == 0
    finally:
        await gw.stop()
        await m.stop()


async def test_auth_and_per_key_limits_and_replica_token() -> None:
    m = await MockReplica(replica_id="m", shared_token="replica-secret").start()
    auth = {"enabled": True, "api_keys": [
        {"name": "a", "sha256": hashlib.sha256(b"key-a").hexdigest(), "requests_per_minute": 3},
        {"name": "b", "sha256": hashlib.sha256(b"key-b").hexdigest(), "tokens_per_minute": 10}]}
    gw = await RunningGateway(config([m.url], auth=auth, replicas={"shared_token": "replica-secret"})).start()
    try:
        await gw.wait_healthy(1)
        url = gw.url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "key-a"}):
                async with s.post(url, json=CHAT, headers=headers) as r:
                    assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
            async with s.get(gw.url + "/v1/models") as r:
                assert r.status == 401
            ha = {"Authorization": "Bearer key-a"}
            for _ in range(3):
                async with s.post(url, json=CHAT, headers=ha) as r:
                    assert r.status == 200
            async with s.post(url, json=CHAT, headers=ha) as r:
                assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
                assert (await r.json())["error"]["code"] == "requests_per_minute"
            hb = {"Authorization": "Bearer key-b"}
            statuses = []
            for _ in range(4):  # each reserves 3 (max_tokens) and uses 4: the third would pass 10
                async with s.post(url, json=CHAT, headers=hb) as r:
                    statuses.append(r.status)
            assert statuses == [200, 200, 429, 429]
            async with s.get(gw.url + "/admin/replicas", headers=ha) as r:
                assert r.status == 403  # no admin key configured while auth is on
        assert m.num_auth_failures == 0 and m.num_requests >= 5
    finally:
        await gw.stop()
        await m.stop()


async def test_retry_budget_holds_during_an_outage() -> None:
    ms = [await MockReplica(MockKnobs(status_override=503), replica_id=f"m{i}").start() for i in range(2)]
    for m in ms:
        m.knobs.status_override = 500
    gw = await RunningGateway(config([m.url for m in ms], retry={"budget_ratio": 0.1, "budget_min_per_s": 0.0,
                                                                  "max_attempts": 3},
                                     breaker={"failure_threshold": 10_000, "min_requests": 10_000,
                                              "window_requests": 10_000})).start()
    try:
        await gw.wait_healthy(2)
        num = 100
        async with aiohttp.ClientSession() as s:
            for _ in range(num):
                async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 500
        sent = sum(m.num_requests for m in ms)
        assert num <= sent <= num * 1.1 + 1, f"{sent} upstream requests for {num} client requests"
        text = gw.gateway.metrics.render().decode()
        assert "unbroken_gateway_retry_budget_exhausted_total" in text
    finally:
        await gw.stop()
        for m in ms:
            await m.stop()


async def test_shedding_returns_retry_after() -> None:
    m = await MockReplica(MockKnobs(response_delay_ms=300), replica_id="m").start()
    gw = await RunningGateway(config([m.url], degradation={"overload_inflight_per_replica": 2, "queue_max_depth": 1,
                                                           "queue_timeout_s": 2.0, "retry_after_s": 3,
                                                           "shed_batch_at_fraction": 0.5})).start()
    try:
        await gw.wait_healthy(1)
        async with aiohttp.ClientSession() as s:
            async def one(priority: str, max_tokens: int = 3) -> tuple[int, Any, Any]:
                async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "max_tokens": max_tokens},
                                  headers={"X-Priority": priority}) as r:
                    return r.status, r.headers.get("Retry-After"), r.headers.get("X-Unbroken-Degraded")

            tasks = [asyncio.create_task(one("normal")) for _ in range(2)]
            await asyncio.sleep(0.05)
            queued = asyncio.create_task(one("normal", max_tokens=1000))  # clamped to 256, then queued
            await asyncio.sleep(0.05)
            shed_normal = await one("normal")  # the queue (1) is full
            shed_batch = await one("batch")
            results = await asyncio.gather(*tasks)
            assert shed_normal[0] == 503 and shed_normal[1] == "3" and shed_normal[2] == "shed"
            assert shed_batch[0] == 429 and shed_batch[1] == "3" and shed_batch[2] == "shed"
            assert [r[0] for r in results] == [200, 200]
            q = await queued
            assert q[0] == 200 and q[2] == "clamped,queued"
        text = gw.gateway.metrics.render().decode()
        assert 'unbroken_gateway_degradations_total{tier="queued"} 1.0' in text
        assert 'unbroken_gateway_degradations_total{tier="shed"} 2.0' in text
        assert 'unbroken_gateway_sheds_total{priority="normal",tier="queue"} 1.0' in text
        assert 'unbroken_gateway_sheds_total{priority="batch",tier="batch"} 1.0' in text
    finally:
        await gw.stop()
        await m.stop()


async def test_a_stuck_client_does_not_hold_up_others_and_metrics_parse() -> None:
    m = await MockReplica(replica_id="m").start()
    gw = await RunningGateway(config([m.url], server={"client_write_timeout_s": 0.5, "shutdown_timeout_s": 0.5})).start()
    try:
        await gw.wait_healthy(1)
        # a client that sends a big stream request and never reads the response
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast
        sock.connect(("127.0.0.1", gw.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        body = b'{"model": "qwen", "messages": [{"role": "user", "content": "x"}], "max_tokens": 50000, ' \
               b'"stream": true, "ignore_eos": true}'
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        # and one that sends half a body and stops
        r2, w2 = await asyncio.open_connection("127.0.0.1", gw.port)
        w2.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mod")
        await w2.drain()
        async with aiohttp.ClientSession() as s:
            async def dropped() -> bool:
                async with s.get(gw.url + "/metrics") as r:
                    return 'unbroken_gateway_client_disconnects_total{reason="timeout"} 1.0' in await r.text()

            worst_s = 0.0
            deadline = time.monotonic() + 20
            while not await dropped():  # meanwhile, other clients are served without waiting on it
                assert time.monotonic() < deadline, "the stuck client was never dropped"
                t0 = time.monotonic()
                async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 200
                worst_s = max(worst_s, time.monotonic() - t0)
            assert worst_s < 0.4, f"a request waited {worst_s:.2f}s"
            async with s.get(gw.url + "/metrics") as r:
                text = await r.text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name in ("unbroken_gateway_requests", "unbroken_gateway_request_duration_seconds",
                     "unbroken_gateway_time_to_first_token_seconds", "unbroken_gateway_inter_token_seconds",
                     "unbroken_gateway_retries", "unbroken_gateway_hedges", "unbroken_gateway_failovers",
                     "unbroken_gateway_degradations", "unbroken_gateway_sheds",
                     "unbroken_gateway_replica_health_state", "unbroken_gateway_replica_breaker_state",
                     "unbroken_gateway_queue_depth"):
            assert name in families, name
        await asyncio.sleep(0.2)
        assert m.num_running == 0, "the replica stream of the dropped client was cancelled"
        writer.close()
        w2.close()
    finally:
        await gw.stop()
        await m.stop()
