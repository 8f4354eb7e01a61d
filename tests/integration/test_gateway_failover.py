"""Mid-stream failover through a real gateway (in-process) in front of mock replicas: the client
sees one exact stream; retries before the first byte are invisible."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from gateway.config import GatewayConfig
from gateway.testing import RunningGateway, parse_sse, stream_tokens
from loadtest.mock_replica import MockKnobs, MockReplica, expected_completion, prompt_text

pytestmark = pytest.mark.asyncio


def gateway_config(urls: list[str], **sections: Any) -> GatewayConfig:
    data: dict[str, Any] = {"server": {"port": 0}, "replicas": {"urls": urls, "stall_timeout_s": 0.5},
                            "routing": {"session_affinity": False, "policy": "round_robin"},
                            "retry": {"backoff_initial_ms": 1, "backoff_max_ms": 5}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return GatewayConfig.model_validate(data)


@pytest_asyncio.fixture
async def mocks() -> AsyncIterator[list[MockReplica]]:
    ms = [await MockReplica(MockKnobs(token_interval_ms=1), replica_id=f"m{i}").start() for i in range(3)]
    try:
        yield ms
    finally:
        for m in ms:
            await m.stop()


async def _gateway(ms: list[MockReplica], **sections: Any) -> RunningGateway:
    gw = await RunningGateway(gateway_config([m.url for m in ms], **sections)).start()
    await gw.wait_healthy(len(ms))
    return gw


CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 40,
        "stream": True}


async def _stream(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict, list]:  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body, headers=headers or {}) as r:
            return r.status, dict(r.headers), parse_sse(await r.text())


@pytest.mark.parametrize("fault", ["crash_after_tokens", "stall_after_tokens"])
async def test_mid_stream_fault_gives_one_exact_stream(mocks: list[MockReplica], fault: str) -> None:
    setattr(mocks[0].knobs, fault, 7)
    gw = await _gateway(mocks[:2])
    try:
        for _ in range(2):  # round robin: one of the two lands on the faulty replica
            status, headers, events = await _stream(gw.url + "/v1/chat/completions", CHAT)
            assert status == 200
            ids, text = stream_tokens(events)
            want_ids, want_text = expected_completion(prompt_text(CHAT), 40)
            assert ids == want_ids and text == want_text
            chunks = [e for e in events if isinstance(e, dict)]
            assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
            assert sum(1 for c in chunks for ch in c["choices"] if "role" in (ch.get("delta") or {})) == 1
            assert events[-1] == "[DONE]"
            assert sum(1 for c in chunks for ch in c["choices"] if ch.get("finish_reason")) == 1
        assert mocks[1].num_resumed == 1 and mocks[1].last_resume_len == 7 and mocks[1].num_bad_resumes == 0
        assert chunks[-1]["unbroken"]["failovers"] in (0, 1)
        text = gw.gateway.metrics.render().decode()
        assert 'unbroken_gateway_failovers_total{reason="' in text
    finally:
        await gw.stop()


async def test_completions_stream_with_usage_survives_two_crashes(mocks: list[MockReplica]) -> None:
    mocks[0].knobs.crash_after_tokens = 3
    mocks[1].knobs.crash_after_tokens = 5
    gw = await _gateway(mocks, routing={"policy": "least_load"})
    try:
        body = {"model": "qwen", "prompt": "once upon a time", "max_tokens": 30, "stream": True,
                "stream_options": {"include_usage": True}}
        # force the first attempt onto mocks[0] by making the others look busy
        mocks[1].knobs.kv_bytes_free = mocks[2].knobs.kv_bytes_free = 1 << 30
        gw.gateway.replicas.find("m1").num_inflight += 5
        gw.gateway.replicas.find("m2").num_inflight += 10
        status, _, events = await _stream(gw.url + "/v1/completions", body)
        gw.gateway.replicas.find("m1").num_inflight -= 5
        gw.gateway.replicas.find("m2").num_inflight -= 10
        ids, text = stream_tokens(events)
        assert (ids, text) == expected_completion(prompt_text(body), 30)
        usage = [e for e in events if isinstance(e, dict) and e.get("usage")]
        assert usage and usage[-1]["usage"]["completion_tokens"] == 30
        assert usage[-1]["unbroken"]["failovers"] == 2
        assert mocks[2].last_resume_len == 8
    finally:
        await gw.stop()


async def test_n_greater_than_one_is_refused_at_the_edge_as_the_replica_refuses_it(mocks: list[MockReplica]) -> None:
    gw = await _gateway(mocks[:1])
    try:
        before = mocks[0].num_requests
        async with aiohttp.ClientSession() as s:
            for stream in (True, False):
                async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "n": 2, "stream": stream}) as r:
                    body = await r.json()
                    assert r.status == 400, body
                    assert body["error"]["param"] == "n" and body["error"]["code"] == "unsupported_value"
        assert mocks[0].num_requests == before, "a refused request is never forwarded"
    finally:
        await gw.stop()


async def test_non_stream_retried_whole_on_another_replica(mocks: list[MockReplica]) -> None:
    mocks[0].knobs.crash_after_tokens = 2
    gw = await _gateway(mocks[:2])
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(4):
                async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": False}) as r:
                    assert r.status == 200
                    data = await r.json()
                    assert data["choices"][0]["token_ids"] == expected_completion(prompt_text(CHAT), 40)[0]
                    assert r.headers["X-Replica-ID"] == "m1"
                    assert r.headers["X-Request-ID"]
    finally:
        await gw.stop()


async def test_replica_client_error_is_passed_through_and_not_retried(mocks: list[MockReplica]) -> None:
    mocks[0].knobs.status_override = 400
    gw = await _gateway(mocks[:1])
    try:
        for stream in (False, True):
            async with aiohttp.ClientSession() as s:
                async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": stream}) as r:
                    assert r.status == 400
                    assert (await r.json())["error"]["type"] == "invalid_request_error"
        assert mocks[0].num_requests == 2
        assert gw.gateway.replicas.find("m0").breaker.num_consecutive_failures == 0
    finally:
        await gw.stop()


async def test_critical_requests_are_hedged(mocks: list[MockReplica]) -> None:
    mocks[0].knobs.response_delay_ms = 400
    gw = await _gateway(mocks[:2], retry={"hedge_delay_min_ms": 30, "hedge_delay_max_ms": 50})
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                t0 = asyncio.get_running_loop().time()
                async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": False, "max_tokens": 3},
                                  headers={"X-Priority": "critical"}) as r:
                    assert r.status == 200 and r.headers["X-Replica-ID"] == "m1"
                assert asyncio.get_running_loop().time() - t0 < 0.35
        text = gw.gateway.metrics.render().decode()
        assert 'unbroken_gateway_hedges_total{outcome="won_by_hedge"}' in text
    finally:
        await gw.stop()
