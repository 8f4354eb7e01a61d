"""Security of a real stack started like `unbroken up` (Redis, a replica of the tiny NF4 model with
its kvsync sidecar, the gateway, every part its own process): the generated secrets and where they
may and may not appear, auth on by default, sessions scoped to their key with server-held history,
a 600 KB body, a 400 KB prompt answered 400 at once, and the fuzz properties against a real replica."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import redis
import requests as http
from hypothesis import HealthCheck, given, settings

from gateway.config import GatewayConfig
from gateway.testing import RunningGateway
from loadtest.chaos import running_stack
from unbroken.launcher import Stack, StackConfig

from tests.integration.test_gateway_fuzz import check_response, fuzz_requests


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = StackConfig.model_validate({
        "replicas": {"count": 1, "model_path": str(tiny_model_dir), "ready_timeout_s": 240,
                     "env": {"UNBROKEN_REPLICA__MODEL__MAX_MODEL_LEN": "1024"}},
        "gateway": {"port": 0}, "run": {"stop_timeout_s": 10},
    })
    with running_stack(config, tmp_path_factory.mktemp("sec-stack"), progress=lambda *_: None) as s:
        yield s


def test_secrets_are_made_private_and_never_on_argv_logs_or_stack_json(stack: Stack) -> None:
    assert stack.secrets is not None and stack.api_key and stack.admin_key
    values = [getattr(stack.secrets, f) for f in ("api_key", "admin_key", "replica_token", "sidecar_token",
                                                  "kvsync_hmac_secret", "session_secret", "redis_password")]
    assert len(set(values)) == len(values)
    assert stat.S_IMODE(stack.secrets_dir.stat().st_mode) == 0o700
    for p in stack.secrets_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for proc in stack.processes():
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert not any(v in argv for v in values), proc.name
    texts = [(stack.run_dir / "stack.json").read_text()]
    texts += [p.read_text(errors="replace") for p in stack.run_dir.glob("*.log")]
    assert not any(v in t for v in values for t in texts)
    assert json.loads(texts[0])["auth"] is True
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=stack.redis_port).ping()
    assert redis.Redis.from_url(stack.redis_url).ping()


def test_auth_is_on_by_default(stack: Stack) -> None:
    body = {"model": "qwen", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    assert http.post(stack.url + "/v1/chat/completions", json=body, timeout=60).status_code == 401
    assert http.get(stack.url + "/admin/replicas", headers=stack.auth_headers(), timeout=10).status_code == 403
    assert http.get(stack.url + "/admin/replicas", headers=stack.auth_headers(admin=True), timeout=10).ok
    r = stack.replicas[0]
    assert http.post(r.direct_url + "/v1/chat/completions", json=body, timeout=60).status_code == 401
    c = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key, max_retries=0, timeout=120)
    assert c.chat.completions.create(model="qwen", messages=body["messages"], max_tokens=4).choices[0].message


def test_big_body_and_a_prompt_over_the_context(stack: Stack) -> None:
    hdrs = {**stack.auth_headers(), "Content-Type": "application/json"}
    big = b'{"model": "qwen",' + b" " * 600_000 + b'"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}'
    r = http.post(stack.url + "/v1/chat/completions", data=big, headers=hdrs, timeout=120)
    assert r.status_code == 200, r.text[:300]
    body = {"model": "qwen", "messages": [{"role": "user", "content": "word " * 80_000}], "max_tokens": 4}
    t0 = time.monotonic()
    r = http.post(stack.url + "/v1/chat/completions", json=body, headers=stack.auth_headers(), timeout=60)
    took = time.monotonic() - t0
    print(f"400 KB prompt through the stack: {r.status_code} in {took:.3f}s")
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert took < 3.0


def _turn(gw: RunningGateway, key: str, session: str, text: str) -> dict[str, Any]:
    r = http.post(gw.url + "/v1/chat/completions", timeout=120, json={
        "model": "qwen", "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0},
        headers={"Authorization": f"Bearer {key}", "X-Session-ID": session, "X-Session-History": "server"})
    assert r.status_code == 200, r.text[:300]
    return r.json()


def test_two_keys_with_one_session_id_never_share_a_conversation(stack: Stack) -> None:
    """Server-held history: B, sending A's session id, sees none of A's conversation, and A's next turn
    is exactly what it is in a control conversation nobody else touched."""
    keys = [{"name": n, "sha256": hashlib.sha256(n.encode()).hexdigest()} for n in ("key-a", "key-b")]
    cfg = GatewayConfig.model_validate({
        "server": {"port": 0, "shutdown_timeout_s": 1.0}, "replicas": {
            "urls": [stack.replicas[0].direct_url], "shared_token": stack.replica_token},
        "auth": {"enabled": True, "api_keys": keys, "session_secret": "test-secret"}})
    gw = RunningGateway(cfg).start_in_thread(num_healthy=1, timeout_s=30)
    try:
        a1 = _turn(gw, "key-a", "shared-conv", "Hello there")
        a2 = _turn(gw, "key-a", "shared-conv", "And then")
        assert a2["usage"]["prompt_tokens"] > a1["usage"]["prompt_tokens"]  # the history is the server's
        b1 = _turn(gw, "key-b", "shared-conv", "Hello there")
        assert b1["usage"]["prompt_tokens"] == a1["usage"]["prompt_tokens"]  # none of A's turns
        assert b1["choices"][0]["message"]["content"] == a1["choices"][0]["message"]["content"]
        a3 = _turn(gw, "key-a", "shared-conv", "Finally")
        for text in ("Hello there", "And then"):
            _turn(gw, "key-a", "control", text)
        c3 = _turn(gw, "key-a", "control", "Finally")
        assert a3["usage"]["prompt_tokens"] == c3["usage"]["prompt_tokens"]
        assert a3["choices"][0]["message"]["content"] == c3["choices"][0]["message"]["content"]
        state = http.get(stack.replicas[0].direct_url + "/state", timeout=10,
                         headers={"Authorization": f"Bearer {stack.replica_token}"}).json()
        assert "shared-conv" not in json.dumps(state.get("sessions"))
    finally:
        gw.stop_thread()


@settings(max_examples=int(os.environ.get("UNBROKEN_FUZZ_REAL_EXAMPLES", "150")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(req=fuzz_requests)
def test_fuzz_against_a_real_replica(stack: Stack, req: Any) -> None:
    route, body, hdrs = req
    hdrs = {k: v for k, v in hdrs.items() if v or k == "Authorization"}
    if hdrs.get("Authorization") in ("Bearer sk-fuzz", "Bearer sk-vip", None):
        hdrs["Authorization"] = f"Bearer {stack.api_key}"
    check_response(http.post(stack.url + route, data=body, headers=hdrs, timeout=120))


def test_after_fuzzing_the_replica_is_not_blamed(stack: Stack) -> None:
    r = http.get(stack.url + "/admin/replicas", headers=stack.auth_headers(admin=True), timeout=10).json()
    for rep in r["replicas"]:
        assert rep["state"] == "healthy" and rep["breaker"] == "closed", rep
    c = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key, max_retries=0, timeout=120)
    assert c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "ok?"}], max_tokens=4)
