"""The ``openai`` client works unchanged against the gateway: chat, stream, completions, models,
and its error types; plus ``python -m gateway`` as a real process with several workers."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Iterator

import openai
import pytest

from gateway.config import GatewayConfig
from gateway.testing import RunningGateway
from loadtest.mock_replica import MockKnobs, MockReplica, expected_completion, prompt_text
from unbroken.procs import ManagedProcess, free_port


@pytest.fixture
def stack() -> Iterator[tuple[RunningGateway, list[MockReplica]]]:
    ms = [MockReplica(MockKnobs(token_interval_ms=1), replica_id=f"m{i}", adapters=("sql",) if i else ())
          .start_in_thread() for i in range(2)]
    cfg = GatewayConfig.model_validate({
        "server": {"port": 0, "shutdown_timeout_s": 1.0}, "replicas": {"urls": [m.url for m in ms]},
        "auth": {"enabled": True, "api_keys": [{"name": "t", "sha256": hashlib.sha256(b"sk-test").hexdigest()}]},
        "retry": {"backoff_initial_ms": 1, "backoff_max_ms": 2}})
    gw = RunningGateway(cfg).start_in_thread(num_healthy=2)
    try:
        yield gw, ms
    finally:
        gw.stop_thread()
        for m in ms:
            m.stop_thread()


def test_openai_client_chat_stream_completions_models(stack) -> None:  # type: ignore[no-untyped-def]
    gw, ms = stack
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-test", max_retries=0, timeout=10)
    msgs = [{"role": "user", "content": "hello there"}]
    want_ids, want_text = expected_completion(prompt_text({"messages": msgs}), 12)
    r = client.chat.completions.create(model="qwen", messages=msgs, max_tokens=12)  # type: ignore[arg-type]
    assert r.choices[0].message.content == want_text and r.usage and r.usage.completion_tokens == 12
    raw = client.chat.completions.with_raw_response.create(model="qwen", messages=msgs, max_tokens=2,  # type: ignore[arg-type]
                                                           extra_headers={"X-Request-ID": "req-42"})
    assert raw.headers["x-request-id"] == "req-42" and raw.headers["x-replica-id"] in ("m0", "m1")
    ms[0].knobs.crash_after_tokens = ms[1].knobs.crash_after_tokens = -1
    ms[1].knobs.crash_after_tokens = 5
    for _ in range(2):
        stream = client.chat.completions.create(model="qwen", messages=msgs, max_tokens=12, stream=True,  # type: ignore[arg-type]
                                                stream_options={"include_usage": True})
        parts, ids = [], []
        for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                ids.extend((chunk.choices[0].model_extra or {}).get("token_ids") or [])
        assert "".join(parts) == want_text and ids == want_ids
    c = client.completions.create(model="qwen", prompt="abc", max_tokens=5)
    assert c.choices[0].text == expected_completion("abc", 5)[1]
    c = client.completions.create(model="qwen:sql", prompt="abc", max_tokens=3)
    assert c.choices[0].text == expected_completion("abc", 3)[1]
    assert {m.id for m in client.models.list()} == {"qwen", "qwen:sql"}


def test_openai_client_error_types(stack) -> None:  # type: ignore[no-untyped-def]
    gw, ms = stack
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-test", max_retries=0, timeout=10)
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.NotFoundError) as e1:
        client.chat.completions.create(model="nope", messages=msgs)  # type: ignore[arg-type]
    assert e1.value.code == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="qwen", messages=msgs, max_tokens=-3)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen", messages=[])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0).models.list()
    for m in ms:
        m.knobs.status_override = 500
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="qwen", messages=msgs)  # type: ignore[arg-type]


def test_gateway_process_with_two_workers_and_redis(redis_url: str, tmp_path: Path) -> None:
    mock_port, gw_port = free_port(), free_port()
    mock = ManagedProcess("mock", [sys.executable, "-m", "loadtest.mock_replica", "--port", str(mock_port),
                                   "--replica-id", "p0"], log_path=tmp_path / "mock.log",
                          ready_url=f"http://127.0.0.1:{mock_port}/health").start()
    gw = ManagedProcess("gateway", [sys.executable, "-m", "gateway", "--port", str(gw_port), "--workers", "2",
                                    "--replica", f"http://127.0.0.1:{mock_port}", "--redis-url", redis_url],
                        log_path=tmp_path / "gateway.log", ready_url=f"http://127.0.0.1:{gw_port}/readyz")
    try:
        mock.wait_ready(30)
        gw.start().wait_ready(60)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw_port}/v1", api_key="x", max_retries=0, timeout=10)
        for i in range(8):
            r = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": f"q{i}"}],  # type: ignore[list-item]
                                               max_tokens=3)
            assert r.choices[0].finish_reason == "length"
        assert gw.stop(timeout_s=15) == 0, gw.log_tail()
    finally:
        gw.stop()
        mock.stop()
