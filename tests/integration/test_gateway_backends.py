"""The gateway in front of other engines (emulated vLLM, SGLang and TGI servers on free ports):
kinds detected, load read from each engine's metrics, and every misbehaviour of the issue answered
with a complete exact answer, a complete continued answer (text mode) or a clear error event —
never a truncated or duplicated answer presented as success; the gateway serves normally after."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.testing import RunningGateway, parse_sse
from loadtest.emulators import EmulatorKnobs, EngineEmulator, expected_text, make_emulator, prompt_base

pytestmark = pytest.mark.asyncio

KINDS = ["vllm", "sglang", "tgi", "llamacpp"]
NO_CHAT_RESUME = ("tgi", "llamacpp")
N = 24
CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": N,
        "stream": True}
COMPLETION = {"model": "qwen", "prompt": "once upon a time", "max_tokens": N, "stream": True,
              "stream_options": {"include_usage": True}}


def config(urls: list[str], **sections: Any) -> GatewayConfig:
    data: dict[str, Any] = {
        "server": {"port": 0},
        "replicas": {"urls": urls, "stall_timeout_s": 0.5, "first_byte_timeout_s": 1.0, "retry_after_default_s": 1.0},
        "routing": {"session_affinity": False, "policy": "round_robin"},
        "retry": {"backoff_initial_ms": 1, "backoff_max_ms": 5, "hedge_critical": False},
        "health": {"heartbeat_interval_ms": 50, "heartbeat_timeout_ms": 500},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return GatewayConfig.model_validate(data)


async def start_gateway(emus: list[EngineEmulator], **sections: Any) -> RunningGateway:
    gw = await RunningGateway(config([e.url for e in emus], **sections)).start()
    await gw.wait_healthy(len(emus), timeout_s=10)
    return gw


@pytest_asyncio.fixture(params=KINDS)
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[list[EngineEmulator]]:
    emus = [await make_emulator(request.param, EmulatorKnobs(token_interval_ms=1), name=f"{request.param}{i}").start()
            for i in range(2)]
    try:
        yield emus
    finally:
        for e in emus:
            await e.stop()


async def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as r:
            if body.get("stream") and r.status == 200:
                return r.status, dict(r.headers), parse_sse(await r.text())
            return r.status, dict(r.headers), await r.json()


def text_of(events: list[Any]) -> str:
    out = ""
    for ev in events:
        if isinstance(ev, dict):
            for ch in ev.get("choices") or []:
                out += (ch.get("delta") or {}).get("content") or ch.get("text") or ""
    return out


def route_of(body: dict[str, Any]) -> str:
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


def want(body: dict[str, Any], n: int = N) -> str:
    return expected_text(prompt_base(body, "messages" in body)[0], n)


def assert_complete(events: list[Any], body: dict[str, Any]) -> None:
    """A whole answer, exactly once, ended properly."""
    assert events and events[-1] == "[DONE]", events[-3:]
    assert text_of(events) == want(body)
    chunks = [e for e in events if isinstance(e, dict)]
    assert not any("error" in c for c in chunks)
    assert sum(1 for c in chunks for ch in c.get("choices") or [] if ch.get("finish_reason")) == 1
    assert len({c["id"] for c in chunks}) == 1


def assert_clear_error(events: list[Any], body: dict[str, Any]) -> None:
    """Not presented as complete: no [DONE], an error event last, and what came before is a true
    beginning of the answer (nothing glued)."""
    assert "[DONE]" not in events
    assert isinstance(events[-1], dict) and "error" in events[-1], events[-2:]
    got = text_of(events)
    assert want(body).startswith(got) and len(got) < len(want(body))


async def serves_normally(gw: RunningGateway, body: dict[str, Any] = CHAT) -> None:
    for _ in range(2):
        status, _, events = await post(gw.url + route_of(body), body)
        assert status == 200
        assert_complete(events, body)


# -- kinds, signals ------------------------------------------------------------------------------

async def test_kind_is_detected_and_its_load_routes(pair: list[EngineEmulator]) -> None:
    kind = pair[0].flavor.kind
    pair[0].knobs.num_running_override = 7  # a busy engine, by its own metrics
    gw = await start_gateway(pair, routing={"policy": "least_load"})
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url + "/admin/replicas") as r:
                reps = (await r.json())["replicas"]
        assert {r["kind"] for r in reps} == {kind}
        assert {r["backend_version"] for r in reps} == {pair[0].flavor.version}
        assert reps[0]["resume"] == {"chat": "none" if kind in NO_CHAT_RESUME else "text", "completions": "text"}
        busy = gw.gateway.replicas.find(pair[0].url)
        deadline = asyncio.get_running_loop().time() + 5
        while (busy.report is None or busy.report.num_running != 7) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert busy.report is not None and busy.report.num_running == 7
        if kind != "tgi":
            assert busy.kv_used_fraction == pytest.approx(0.1)
        for _ in range(4):
            status, headers, events = await post(gw.url + "/v1/chat/completions", CHAT)
            assert status == 200 and headers["X-Replica-ID"] == gw.gateway.replicas.find(pair[1].url).replica_id
            assert headers["X-Unbroken-Model"] == "qwen"
            assert_complete(events, CHAT)
        metrics = gw.gateway.metrics.render().decode()
        assert f'kind="{kind}"' in metrics
    finally:
        await gw.stop()


async def test_explicit_openai_kind_and_a_404_server_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    app = web.Application()  # answers 404 to everything, like a server of no kind we know
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    bad_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    emu = await make_emulator("vllm").start()
    caplog.set_level(logging.INFO)
    gw = await RunningGateway(config([bad_url, emu.url], replicas={"kinds": {emu.url: "openai"}})).start()
    try:
        await gw.wait_healthy(1, timeout_s=10)
        assert gw.gateway.replicas.find(emu.url).kind == "openai"
        status, _, events = await post(gw.url + "/v1/chat/completions", CHAT)
        assert status == 200 and text_of(events) == want(CHAT)
        assert any("joined rotation" in r.getMessage() and "openai" in r.getMessage() for r in caplog.records)
        bad = gw.gateway.replicas.find(bad_url)
        deadline = asyncio.get_running_loop().time() + 5
        while not bad.last_heartbeat_error and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert "all failed" in bad.last_heartbeat_error
        await emu.stop()  # now nothing can serve: the 503 says so, and so does the log
        deadline = asyncio.get_running_loop().time() + 5
        while gw.gateway.replicas.num_healthy() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        status, _, err = await post(gw.url + "/v1/chat/completions", {**CHAT, "stream": False})
        assert status == 503 and err["error"]["code"] == "no_replica_available"
        lines = [r.getMessage() for r in caplog.records if "no_replica_available" in r.getMessage()]
        assert lines and bad.replica_id in lines[-1] and "left rotation" in " ".join(
            r.getMessage() for r in caplog.records)
    finally:
        await gw.stop()
        await runner.cleanup()


# -- before the first byte: retried invisibly, exactly -------------------------------------------

@pytest.mark.parametrize("fault", ["rate_limit", "rate_limit_no_retry_after", "fail_5xx", "reset", "hang",
                                   "slow_first_token"])
async def test_fault_before_first_byte_is_invisible(pair: list[EngineEmulator], fault: str) -> None:
    bad = pair[0]
    if fault.startswith("rate_limit"):
        bad.knobs.rate_limit_n = 100
        bad.knobs.retry_after_s = None if fault.endswith("no_retry_after") else 30
    elif fault == "fail_5xx":
        bad.knobs.fail_5xx_n = 1
    elif fault == "reset":
        bad.knobs.reset_n = 1
    elif fault == "hang":
        bad.knobs.hang_n = 1
    else:
        bad.knobs.first_token_delay_ms = 3000
    gw = await start_gateway(pair, replicas={"retry_after_default_s": 30})
    try:
        for body in (CHAT, COMPLETION, {**CHAT, "stream": False}):
            for _ in range(2):  # round robin: one of each pair lands on the bad engine first
                status, headers, out = await post(gw.url + route_of(body), body)
                assert status == 200, out
                if body.get("stream"):
                    assert_complete(out, body)
                else:
                    assert out["choices"][0]["message"]["content"] == want(body)
                    assert out["usage"]["completion_tokens"] == N and out["model"] == "qwen"
        if fault.startswith("rate_limit"):
            assert bad.num_requests == 1  # kept out for its Retry-After (or the default): never hammered
            rep = gw.gateway.replicas.find(bad.url)
            assert rep.cooldown_until_s > asyncio.get_running_loop().time() - 60
            assert "replica_rate_limited_total" in gw.gateway.metrics.render().decode()
        bad.knobs.first_token_delay_ms = 0
    finally:
        await gw.stop()


async def test_429_everywhere_waits_out_retry_after_without_hammering(pair: list[EngineEmulator]) -> None:
    for e in pair:
        e.knobs.rate_limit_n = 1
        e.knobs.retry_after_s = 0.3
    gw = await start_gateway(pair, replicas={"no_replica_wait_s": 3.0})
    try:
        t0 = asyncio.get_running_loop().time()
        status, _, events = await post(gw.url + "/v1/chat/completions", CHAT)
        assert status == 200 and text_of(events) == want(CHAT)
        assert asyncio.get_running_loop().time() - t0 >= 0.25  # waited for a Retry-After to pass
        assert sum(e.num_requests for e in pair) == 3
    finally:
        await gw.stop()


async def test_persistent_5xx_opens_the_breaker_and_is_logged(pair: list[EngineEmulator],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pair[0].knobs.fail_5xx_always = True
    gw = await start_gateway(pair, breaker={"failure_threshold": 2, "open_duration_s": 30})
    try:
        for _ in range(6):
            status, _, events = await post(gw.url + "/v1/chat/completions", CHAT)
            assert status == 200 and text_of(events) == want(CHAT)
        assert gw.gateway.replicas.find(pair[0].url).breaker.state.value == "open"
        assert any("breaker of" in r.getMessage() and "opened" in r.getMessage() for r in caplog.records)
        assert pair[0].num_requests == 2
    finally:
        await gw.stop()


# -- after the first byte: resumed by text, or a clear error event -------------------------------

MID_STREAM = ["cut_after_tokens", "stall_after_tokens", "malformed_after_tokens", "end_without_done_after_tokens"]


@pytest.mark.parametrize("fault", MID_STREAM)
@pytest.mark.parametrize("body", [CHAT, COMPLETION], ids=["chat", "completions"])
async def test_mid_stream_fault(pair: list[EngineEmulator], fault: str, body: dict[str, Any]) -> None:
    kind = pair[0].flavor.kind
    setattr(pair[0].knobs, fault, 9)
    gw = await start_gateway(pair)
    try:
        results = [await post(gw.url + route_of(body), body) for _ in range(2)]
        assert all(status == 200 for status, _, _ in results)
        broken = [events for _, _, events in results if "[DONE]" not in events
                  or any(isinstance(e, dict) and (e.get("unbroken") or {}).get("failovers") for e in events)]
        assert len(broken) == 1, "the fault hit exactly one of the two streams"
        events = broken[0]
        resumable = not (kind in NO_CHAT_RESUME and body is CHAT)
        if resumable:
            assert_complete(events, body)
            stamp = [e["unbroken"] for e in events if isinstance(e, dict) and "unbroken" in e]
            assert stamp[-1]["failovers"] == 1 and stamp[-1]["resume"] == "text" and stamp[-1]["exact"] is False
            assert pair[1].num_continued == 1 and pair[1].num_bad_prefixes == 0
            if body is COMPLETION:
                usage = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
                assert usage[-1]["completion_tokens"] == N
            assert 'mode="text"' in gw.gateway.metrics.render().decode()
        else:
            assert_clear_error(events, body)
            assert "could not be resumed" in events[-1]["error"]["message"]
            assert pair[1].num_continued == 0
        await serves_normally(gw, body)
    finally:
        await gw.stop()


async def test_finish_without_done_is_completed(pair: list[EngineEmulator]) -> None:
    pair[0].knobs.omit_done = True
    gw = await start_gateway(pair)
    try:
        for _ in range(2):
            status, _, events = await post(gw.url + "/v1/chat/completions", CHAT)
            assert status == 200
            assert_complete(events, CHAT)
        assert pair[1].num_continued == 0 and pair[0].num_continued == 0
    finally:
        await gw.stop()


async def test_fallback_that_refuses_the_prefix_ends_with_an_error_not_a_glued_answer() -> None:
    a = await make_emulator("vllm", EmulatorKnobs(token_interval_ms=1, cut_after_tokens=5), name="a").start()
    b = await make_emulator("vllm", EmulatorKnobs(token_interval_ms=1, refuse_prefix=True), name="b").start()
    gw = await start_gateway([a, b], routing={"policy": "least_load"})
    try:
        gw.gateway.replicas.find(b.url).num_inflight += 5  # the first attempt goes to a
        status, _, events = await post(gw.url + "/v1/chat/completions", CHAT)
        gw.gateway.replicas.find(b.url).num_inflight -= 5
        assert status == 200
        assert_clear_error(events, CHAT)
        assert text_of(events) == want(CHAT, 5)
        assert b.num_continued == 0 and b.num_generations == 0
        await serves_normally(gw)
    finally:
        await gw.stop()
        await a.stop()
        await b.stop()


# -- errors that must not be resent unchanged ----------------------------------------------------

async def test_context_length_goes_to_the_larger_model_or_back_to_the_client(pair: list[EngineEmulator]) -> None:
    for e in pair:
        e.knobs.max_model_len = 20
    big = await make_emulator(pair[0].flavor.kind, EmulatorKnobs(max_model_len=4096), model="qwen-long").start()
    gw = await start_gateway([*pair, big])
    try:
        status, _, err = await post(gw.url + "/v1/chat/completions", {**CHAT, "stream": False})
        assert status == 400 and err["error"]["code"] == "context_length_exceeded"
        assert sum(e.num_requests for e in pair) == 1  # never resent unchanged
    finally:
        await gw.stop()
    gw = await start_gateway([*pair, big], degradation={"context_fallback_models": {"qwen": "qwen-long"}})
    try:
        for body in (CHAT, {**CHAT, "stream": False}):
            status, headers, out = await post(gw.url + "/v1/chat/completions", body)
            assert status == 200 and headers["X-Unbroken-Model"] == "qwen-long"
            if body.get("stream"):
                assert text_of(out) == want(body) and {e["model"] for e in out if isinstance(e, dict)} == {"qwen-long"}
            else:
                assert out["model"] == "qwen-long" and out["usage"]["completion_tokens"] == N
        assert 'reason="context_length"' in gw.gateway.metrics.render().decode()
    finally:
        await gw.stop()
        await big.stop()


async def test_content_policy_refusal_is_passed_on_and_not_retried(pair: list[EngineEmulator]) -> None:
    for e in pair:
        e.knobs.refuse_word = "story"
    gw = await start_gateway(pair)
    try:
        for body in (CHAT, {**CHAT, "stream": False}):
            status, _, err = await post(gw.url + "/v1/chat/completions", body)
            assert status == 400 and err["error"]["code"] == "content_policy_violation"
            assert "content policy" in err["error"]["message"]
        assert sum(e.num_requests for e in pair) == 2
        assert all(r.breaker.num_consecutive_failures == 0 for r in gw.gateway.replicas)
    finally:
        await gw.stop()


async def test_model_fallback_list_on_errors(pair: list[EngineEmulator]) -> None:
    for e in pair:
        e.knobs.fail_5xx_always = True
    other = await make_emulator(pair[0].flavor.kind, model="qwen-b").start()
    gw = await start_gateway([*pair, other], degradation={"error_fallback_models": {"qwen": ["nope", "qwen-b"]}})
    try:
        status, headers, events = await post(gw.url + "/v1/chat/completions", CHAT)
        assert status == 200 and headers["X-Unbroken-Model"] == "qwen-b"
        assert text_of(events) == want(CHAT)
    finally:
        await gw.stop()
        await other.stop()


async def test_a_flapping_primary_leaves_and_rejoins(pair: list[EngineEmulator],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    gw = await start_gateway(pair)
    rep = gw.gateway.replicas.find(pair[0].url)
    loop = asyncio.get_running_loop()
    try:
        for _ in range(2):
            pair[0].knobs.down = True
            deadline = loop.time() + 5
            while rep.state.value == "healthy" and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert rep.state.value != "healthy"
            for _ in range(3):
                status, headers, events = await post(gw.url + "/v1/chat/completions", CHAT)
                assert status == 200 and headers["X-Replica-ID"] != rep.replica_id
                assert_complete(events, CHAT)
            pair[0].knobs.down = False
            deadline = loop.time() + 5
            while rep.state.value != "healthy" and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert rep.state.value == "healthy"
        msgs = " ".join(r.getMessage() for r in caplog.records)
        assert "left rotation" in msgs and "joined rotation" in msgs
        await serves_normally(gw)
    finally:
        await gw.stop()


async def test_llamacpp_requests_carry_repeat_penalty_one() -> None:
    """llama-cpp-python's default repeat_penalty (1.1) would change a greedy answer: the gateway sends 1.0."""
    emu = await make_emulator("llamacpp", name="llamacpp0").start()
    gw = await start_gateway([emu])
    try:
        for body in (COMPLETION, CHAT):
            status, _, _ = await post(gw.url + route_of(body), body)
            assert status == 200
            assert emu.last_body is not None and emu.last_body["repeat_penalty"] == 1.0
    finally:
        await gw.stop()
        await emu.stop()
