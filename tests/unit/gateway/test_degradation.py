import asyncio
import time

import pytest

from gateway.config import BreakerSection, DegradationSection
from gateway.degradation import DegradationController
from gateway.protocol import CHAT_ROUTE, parse_request
from gateway.replicaset import ReplicaSet, ReplicaState, report_from_json
from unbroken.errors import NoReplicaError, OverloadedError, ShedError


def setup(models=("qwen",), **cfg):  # type: ignore[no-untyped-def]
    rs = ReplicaSet(BreakerSection())
    for i, m in enumerate(models):
        rep = rs.add(f"http://127.0.0.1:{9100 + i}")
        rs.set_report(rep, report_from_json({"model": m}))
        rs.set_state(rep, ReplicaState.HEALTHY)
    return rs, DegradationController(DegradationSection(**cfg), rs)


def req(priority="normal", model="qwen", max_tokens=1000):  # type: ignore[no-untyped-def]
    return parse_request(CHAT_ROUTE, {"model": model, "messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": max_tokens}, {"X-Priority": priority}, None)


@pytest.mark.asyncio
async def test_tiers_in_order_fallback_clamp_queue_shed() -> None:
    rs, dc = setup(models=("qwen", "small"), overload_inflight_per_replica=1, fallback_models={"qwen": "small"},
                   queue_max_depth=1, queue_timeout_s=0.2, clamp_max_tokens=64, shed_batch_at_fraction=1.0)
    deadline = time.monotonic() + 10
    a1 = await dc.admit(req(), deadline)
    assert a1.tiers == []
    r2 = req()
    a2 = await dc.admit(r2, deadline)
    assert a2.tiers == ["fallback"] and r2.openai.model == "small"
    r3 = req()
    t3 = asyncio.create_task(dc.admit(r3, deadline))
    await asyncio.sleep(0.02)
    assert dc.queue_depth == 1 and r3.openai.max_tokens == 64
    with pytest.raises(OverloadedError) as ei:  # queue full
        await dc.admit(req(), deadline)
    assert ei.value.retry_after_s and ei.value.status == 503
    dc.release(a1)
    a3 = await asyncio.wait_for(t3, 1)
    assert a3.tiers == ["clamped", "queued"]
    r4 = req(priority="critical")
    with pytest.raises(OverloadedError):  # times out in the queue
        await dc.admit(r4, deadline)
    assert r4.openai.max_tokens == 1000, "critical work is not clamped"
    with pytest.raises(ShedError) as ei:
        await dc.admit(req(priority="batch"), deadline)
    assert ei.value.status == 429


@pytest.mark.asyncio
async def test_batch_is_shed_first_and_no_replica_is_503() -> None:
    rs, dc = setup(overload_inflight_per_replica=4, shed_batch_at_fraction=0.5, queue_timeout_s=0.05)
    deadline = time.monotonic() + 10
    await dc.admit(req(), deadline)
    await dc.admit(req(), deadline)
    with pytest.raises(ShedError):
        await dc.admit(req(priority="batch"), deadline)
    assert (await dc.admit(req(), deadline)).tiers == []
    rs2, dc2 = setup(models=(), queue_timeout_s=0.05)
    with pytest.raises(NoReplicaError):
        await dc2.admit(req(), deadline)


@pytest.mark.asyncio
async def test_a_replica_coming_back_wakes_the_queue() -> None:
    rs, dc = setup(queue_timeout_s=2.0)
    rep = next(iter(rs))
    rs.set_state(rep, ReplicaState.UNHEALTHY)
    t = asyncio.create_task(dc.admit(req(), time.monotonic() + 10))
    await asyncio.sleep(0.05)
    assert not t.done()
    rs.set_state(rep, ReplicaState.HEALTHY)
    adm = await asyncio.wait_for(t, 1)
    assert "queued" in adm.tiers
    dc.release(adm)
    assert dc.num_inflight == 0
