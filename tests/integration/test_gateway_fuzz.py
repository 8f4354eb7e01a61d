"""Property-based fuzzing of the gateway's edge: generated bodies (valid, half-valid and garbage)
and headers, sent over real HTTP to a real gateway in front of mock replicas. Whatever is sent:
only 2xx/4xx, OpenAI's error JSON on every 4xx, no replica blamed (every breaker closed, every
replica healthy, no attempt counted against one) and the gateway still serving afterwards.

The request shapes follow the gateway's own ``/openapi.json``. The default run takes about a
minute; ``-m slow`` runs ten times the examples. The same properties against a real replica are
in ``tests/e2e/test_stack_security.py``.
"""

from __future__ import annotations

import hashlib
import json
import string
from typing import Any, Iterator

import orjson
import pytest
import requests as http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import GatewayConfig
from gateway.testing import RunningGateway
from loadtest.mock_replica import MockKnobs, MockReplica

ADMIN = "sk-admin"


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[RunningGateway, list[MockReplica]]]:
    ms = [MockReplica(MockKnobs(token_interval_ms=0), replica_id=f"m{i}").start_in_thread() for i in range(2)]
    cfg = GatewayConfig.model_validate({
        "server": {"port": 0, "shutdown_timeout_s": 1.0, "max_body_bytes": 64 * 1024, "body_read_timeout_s": 5},
        "replicas": {"urls": [m.url for m in ms]},
        "auth": {"enabled": True, "admin_key_sha256": hashlib.sha256(ADMIN.encode()).hexdigest(),
                 "api_keys": [{"name": "fuzz", "sha256": hashlib.sha256(b"sk-fuzz").hexdigest()},
                              {"name": "vip", "sha256": hashlib.sha256(b"sk-vip").hexdigest(),
                               "allow_critical": True}]},
        "retry": {"backoff_initial_ms": 1, "backoff_max_ms": 2}})
    gw = RunningGateway(cfg).start_in_thread(num_healthy=2)
    try:
        yield gw, ms
    finally:
        gw.stop_thread()
        for m in ms:
            m.stop_thread()


def dumps(v: Any) -> bytes:
    return json.dumps(v).encode()  # json, not orjson: integers past 64 bits are fuzz too


json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | \
    st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
small_ints = st.integers(-3, 40)
roles = st.sampled_from(["system", "user", "assistant", "tool", "developer", "admin", ""])
content = st.text(max_size=200) | st.none() | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", ""])}, optional={"text": st.text(max_size=50)}),
    max_size=3) | json_values
message = st.fixed_dictionaries({}, optional={"role": roles, "content": content, "name": st.text(max_size=10)}) | \
    json_values
FIELDS: dict[str, Any] = {
    "model": st.sampled_from(["qwen", "qwen:sql", "", "gpt-9"]) | json_values,
    "max_tokens": small_ints | json_values, "max_completion_tokens": small_ints,
    "n": st.integers(-1, 20), "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
    "top_p": st.floats(-0.5, 1.5, allow_nan=False), "top_k": small_ints, "seed": st.integers(-2**40, 2**40),
    "stream": st.booleans() | json_values, "stream_options": json_values, "stop": st.text(max_size=8) | json_values,
    "user": st.text(max_size=20) | json_values, "ignore_eos": st.booleans(), "min_tokens": small_ints,
    "logprobs": st.booleans() | small_ints, "echo": st.booleans(), "resume_token_ids": json_values,
    "presence_penalty": st.floats(-3, 3, allow_nan=False),
}
chat_body = st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | json_values},
                                  optional={k: v for k, v in FIELDS.items()})
completion_body = st.fixed_dictionaries(
    {"prompt": st.text(max_size=200) | st.lists(st.integers(-5, 70_000), max_size=20) |
     st.lists(st.text(max_size=20), max_size=3) | json_values},
    optional={k: v for k, v in FIELDS.items()})
header_text = st.text(alphabet=string.printable.strip() + " ", max_size=40).map(str.strip)
headers = st.fixed_dictionaries({}, optional={
    "Authorization": st.sampled_from(["Bearer sk-fuzz", "Bearer sk-vip", "Bearer nope", "sk-fuzz", ""]),
    "X-Session-ID": header_text | st.text(alphabet=string.ascii_letters + "-_", min_size=1, max_size=200),
    "X-Session-History": st.sampled_from(["server", "client", ""]) | header_text,
    "X-Priority": st.sampled_from(["critical", "normal", "batch", "CRITICAL", ""]) | header_text,
    "X-Request-ID": header_text,
    "Content-Type": st.sampled_from(["application/json", "text/plain"]),
})
raw_bodies = st.binary(max_size=300) | json_values.map(dumps) | \
    st.integers(65 * 1024, 70 * 1024).map(lambda n: b"{" + b" " * n + b"}")
fuzz_requests = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), chat_body.map(dumps), headers),
    st.tuples(st.just("/v1/completions"), completion_body.map(dumps), headers),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), raw_bodies, headers),
)


def check_response(r: http.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                assert "error" not in orjson.loads(line[5:]), line


def assert_nobody_blamed(gw: RunningGateway) -> None:
    r = http.get(gw.url + "/admin/replicas", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert r.status_code == 200
    for rep in r.json()["replicas"]:
        assert rep["state"] == "healthy" and rep["breaker"] == "closed", rep
    text = http.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).text
    for line in text.splitlines():
        if line.startswith("unbroken_gateway_upstream_attempts_total{"):
            assert 'outcome="ok"' in line or 'outcome="client_error"' in line or line.endswith(" 0.0"), line


def fuzz(gw: RunningGateway, client: http.Session, route: str, body: bytes, hdrs: dict[str, str]) -> None:
    hdrs = {k: v for k, v in hdrs.items() if v or k == "Authorization"}
    hdrs.setdefault("Authorization", "Bearer sk-fuzz")
    r = client.post(gw.url + route, data=body, headers=hdrs, timeout=20)
    check_response(r)


@pytest.mark.timeout(300)
@settings(max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(req=fuzz_requests)
def test_fuzz_gateway_edge(gateway: tuple[RunningGateway, list[MockReplica]], req: Any) -> None:
    gw, _ = gateway
    with http.Session() as client:
        fuzz(gw, client, *req)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@settings(max_examples=4000, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=fuzz_requests)
def test_fuzz_gateway_edge_long(gateway: tuple[RunningGateway, list[MockReplica]], req: Any) -> None:
    gw, _ = gateway
    with http.Session() as client:
        fuzz(gw, client, *req)


def test_after_fuzzing_nobody_is_blamed_and_the_gateway_serves(
        gateway: tuple[RunningGateway, list[MockReplica]]) -> None:
    gw, _ = gateway
    assert http.get(gw.url + "/openapi.json", timeout=10).status_code == 401
    assert http.get(gw.url + "/metrics", timeout=10).status_code == 401  # its labels name the keys
    assert http.get(gw.url + "/metrics", headers={"Authorization": "Bearer sk-fuzz"}, timeout=10).status_code == 403
    spec = http.get(gw.url + "/openapi.json", headers={"Authorization": "Bearer sk-fuzz"}, timeout=10).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(spec["paths"])
    assert_nobody_blamed(gw)
    r = http.post(gw.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-fuzz"}, timeout=10,
                   json={"model": "qwen", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
