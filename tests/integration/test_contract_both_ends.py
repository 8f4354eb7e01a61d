"""One request contract, read the same way at both ends: a real replica process on the tiny model
behind a real gateway. ``max_completion_tokens`` wins over ``max_tokens`` at the gateway (its
degradation clamp) and at the replica (the generated length), and ``n: 2`` gets the same answer
from both."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from gateway.config import GatewayConfig
from gateway.degradation import Admission
from gateway.testing import RunningGateway

pytestmark = pytest.mark.asyncio

CLAMP = 12
BODY = {"model": "qwen", "messages": [{"role": "user", "content": "Count to one hundred, slowly."}],
        "max_tokens": 5, "max_completion_tokens": 30, "ignore_eos": True, "temperature": 0}


@pytest_asyncio.fixture
async def gateway(tiny_replica_url: str) -> AsyncIterator[RunningGateway]:
    config = GatewayConfig.model_validate({
        "server": {"port": 0}, "replicas": {"urls": [tiny_replica_url]},
        "degradation": {"overload_inflight_per_replica": 1, "clamp_max_tokens": CLAMP, "queue_max_depth": 4,
                        "queue_timeout_s": 60.0}})
    gw = await RunningGateway(config).start()
    try:
        await gw.wait_healthy(1, timeout_s=30)
        yield gw
    finally:
        await gw.stop()


async def _post(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], Any]:
    async with s.post(url + "/v1/chat/completions", json=body) as r:
        return r.status, await r.json(), r.headers


def _num_generated(answer: dict[str, Any]) -> int:
    n = answer["usage"]["completion_tokens"]
    assert len(answer["choices"][0]["token_ids"]) == n and answer["choices"][0]["finish_reason"] == "length"
    return n


async def test_max_completion_tokens_wins_at_gateway_and_replica(gateway: RunningGateway, tiny_replica_url: str) -> None:
    async with aiohttp.ClientSession() as s:
        status, direct, _ = await _post(s, tiny_replica_url, BODY)
        assert status == 200 and _num_generated(direct) == 30  # the replica reads max_completion_tokens
        status, relayed, headers = await _post(s, gateway.url, BODY)
        assert status == 200 and _num_generated(relayed) == 30 and "X-Unbroken-Degraded" not in headers
        assert relayed["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]

        # Capacity short: the clamp reads the same 30 (> CLAMP) and the replica generates the clamp.
        dc = gateway.gateway.degradation
        held = Admission("qwen")
        dc._take("qwen")  # the one slot is busy, as with a running request
        task = asyncio.create_task(_post(s, gateway.url, BODY))
        deadline = time.monotonic() + 30
        while dc.queue_depth < 1:
            assert time.monotonic() < deadline and not task.done(), "the request was never queued"
            await asyncio.sleep(0.01)
        dc.release(held)
        status, clamped, headers = await asyncio.wait_for(task, 60)
        assert status == 200, clamped
        assert headers["X-Unbroken-Degraded"] == "clamped,queued"
        assert _num_generated(clamped) == CLAMP
        assert clamped["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"][:CLAMP]


async def test_n_2_is_answered_the_same_at_gateway_and_replica(gateway: RunningGateway, tiny_replica_url: str) -> None:
    async with aiohttp.ClientSession() as s:
        answers = [await _post(s, url, {**BODY, "n": 2}) for url in (tiny_replica_url, gateway.url)]
    (s1, e1, _), (s2, e2, _) = answers
    assert s1 == s2 == 400
    assert e1 == e2 and e1["error"]["param"] == "n" and e1["error"]["code"] == "unsupported_value"


@pytest.mark.parametrize("field,value", [("logit_bias", {"1": 5}), ("tools", [{"type": "function"}]),
                                         ("presence_penalty", 0.5), ("top_logprobs", 21)])
async def test_unsupported_fields_are_answered_the_same_at_gateway_and_replica(
        gateway: RunningGateway, tiny_replica_url: str, field: str, value: Any) -> None:
    async with aiohttp.ClientSession() as s:
        answers = [await _post(s, url, {**BODY, field: value}) for url in (tiny_replica_url, gateway.url)]
    (s1, e1, _), (s2, e2, _) = answers
    assert s1 == s2 and 400 <= s1 < 500
    assert e1 == e2 and e1["error"]["param"] == field
