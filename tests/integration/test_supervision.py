"""Replica supervision and warm standby on a real stack (Redis, tiny-model replicas, gateway), by
``unbroken up``'s own :class:`Stack`:

- a replica killed -9 is restarted by the supervisor, forked by the zygote (``replicas.zygote``),
  and serves again without a person, greedy tokens equal to transformers' generate(); having just
  died and restarted it is unstable, so critical requests avoid it while the other serves;
- with one warm standby (replicas forked from a zygote that loaded the weights: exact greedy tokens
  still), a killed replica's place in rotation is taken by the standby within a
  few seconds (the benchmark measures it tightly), and the killed one comes back as the standby;
- a gateway killed -9 is restarted on its port and serves again; so is the zygote, and the
  replicas it forked live on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import requests
import pytest

from loadtest.chaos import running_stack
from unbroken.launcher import Stack, StackConfig
from unbroken.procs import http_ok
from unbroken.zygote import ping


def _config(model: Path, count: int, standby: int, zygote_load_weights: bool = False) -> StackConfig:
    return StackConfig.model_validate({
        "replicas": {"count": count, "standby": standby, "model_path": str(model), "ready_timeout_s": 240,
                     "zygote_load_weights": zygote_load_weights,
                     "env": {"UNBROKEN_REPLICA__MODEL__MAX_MODEL_LEN": "512"}},
        "kvsync": {"enabled": False},
        "gateway": {"port": 0, "env": {"UNBROKEN_GATEWAY__RETRY__HEDGE_CRITICAL": "false"}},
        "supervisor": {"check_interval_ms": 100, "backoff_initial_s": 0.1},
        "run": {"stop_timeout_s": 10},
    })


def admin(stack: Stack) -> dict[str, dict[str, Any]]:
    body = requests.get(stack.url + "/admin/replicas", headers=stack.auth_headers(admin=True), timeout=5).json()
    return {r["replica_id"]: r for r in body["replicas"]}


def until(cond: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> float:
    """Poll ``cond`` until truthy; the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(interval_s)
    return time.monotonic() - t0


def greedy(stack: Stack, max_tokens: int = 16) -> tuple[str, list[int]]:
    r = requests.post(stack.url + "/v1/chat/completions", timeout=60, headers=stack.auth_headers(),
                      json={"model": "qwen", "messages": MSGS, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.headers.get("X-Replica-ID", ""), r.json()["choices"][0]["token_ids"]


MSGS = [{"role": "user", "content": "Hello"}]


def chat(stack: Stack, priority: str = "normal") -> tuple[int, str]:
    r = requests.post(stack.url + "/v1/chat/completions", timeout=60, headers={"X-Priority": priority, **stack.auth_headers()},
                   json={"model": "qwen", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                         "temperature": 0})
    return r.status_code, r.headers.get("X-Replica-ID", "")


@pytest.fixture
def stack_two(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(_config(tiny_model_dir, 2, 0), tmp_path / "run", progress=lambda *_: None) as s:
        yield s


@pytest.fixture
def stack_standby(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(_config(tiny_model_dir, 1, 1, zygote_load_weights=True), tmp_path / "run",
                       progress=lambda *_: None) as s:
        yield s


def test_killed_replica_is_restarted_and_critical_requests_avoid_it_while_unstable(stack_two: Stack,
                                                                                  reference: Any) -> None:
    stack = stack_two
    assert [via for _, via, _ in stack.replica_starts] == ["zygote", "zygote"], stack.replica_starts
    r0 = stack.replica("r0")
    old_pid = r0.process.pid
    r0.process.kill()
    until(lambda: admin(stack)["r0"]["state"] == "unhealthy", 10, "the gateway to see r0 dead")
    took = until(lambda: r0.process.alive() and r0.process.pid != old_pid
                 and admin(stack)["r0"]["state"] == "healthy", 180, "r0 restarted and back in rotation", 0.2)
    print(f"r0 back in rotation {took:.2f}s after the kill was seen")
    assert stack.supervisor is not None
    assert any(e.program == "r0" and e.kind == "restarted" and "(zygote)" in e.detail for e in stack.supervisor.events)
    assert stack.replica_starts[-1] == ("r0", "zygote", ""), stack.replica_starts  # forked, not started plainly
    assert stack.supervisor.metrics.starts.labels("r0", "zygote")._value.get() == 1
    view = admin(stack)["r0"]
    assert view["stability"]["stable"] is False and view["stability"]["incidents"].get("failure") == 1
    assert admin(stack)["r1"]["stability"]["stable"] is True
    # Critical work stays on the stable replica; r0 serves again (alone, when r1 is drained).
    assert {chat(stack, "critical") for _ in range(8)} == {(200, "r1")}
    assert requests.post(stack.url + "/admin/replicas/r1/drain", headers=stack.auth_headers(admin=True), timeout=5).status_code == 200
    assert chat(stack, "critical") == (200, "r0")
    tok, generate = reference  # the forked replica's greedy tokens are transformers' own
    prompt = tok(tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    assert greedy(stack) == ("r0", generate(prompt, 16))


def test_standby_takes_the_place_of_a_killed_replica_at_once(stack_standby: Stack, reference: Any) -> None:
    stack = stack_standby
    # Both were forked from a zygote that loaded the weights, and inherited them: same greedy tokens.
    assert stack.zygote_socket is not None and ping(stack.zygote_socket).weights_loaded
    for r in stack.replicas:
        assert "model inherited from the zygote" in r.process.log_tail(), r.replica_id
    tok, generate = reference
    prompt = tok(tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    assert greedy(stack) == ("r0", generate(prompt, 16))
    view = admin(stack)
    assert view["r0"]["state"] == "healthy" and view["r1"]["state"] == "standby"
    assert {chat(stack) for _ in range(4)} == {(200, "r0")}  # the standby is never routed to
    r0 = stack.replica("r0")
    old_pid = r0.process.pid
    t_kill = time.monotonic()
    r0.process.kill()
    until(lambda: admin(stack)["r1"]["state"] == "healthy", 5, "the standby to be promoted")
    took = time.monotonic() - t_kill
    print(f"rotation back to full size {took:.3f}s after the kill")
    assert chat(stack) == (200, "r1")
    metrics = requests.get(stack.url + "/metrics", headers=stack.auth_headers(admin=True), timeout=5).text
    assert "unbroken_gateway_standby_promotions_total 1.0" in metrics
    # The supervisor restarts r0, which rejoins as the new standby: the pool is full again.
    until(lambda: r0.process.alive() and r0.process.pid != old_pid
          and admin(stack)["r0"]["state"] == "standby", 180, "r0 back as the standby", 0.2)
    assert admin(stack)["r0"]["role"] == "standby"
    assert {chat(stack) for _ in range(4)} == {(200, "r1")}
    # A gateway killed -9 is restarted on its port by the same supervisor and serves again.
    gw = stack.gateways[0]
    gw_pid = gw.pid
    gw.kill()
    until(lambda: stack.gateways[0].pid != gw_pid and stack.gateways[0].alive()
          and http_ok(stack.url + "/readyz"), 120,
          "the gateway restarted and ready", 0.2)
    assert any(e.program == "gateway" and e.kind == "restarted" for e in stack.supervisor.events)
    # it starts from the configured roles (r0 active, r1 standby): docs/gateway.md, per process
    assert {chat(stack) for _ in range(4)} == {(200, "r0")}
    # The zygote killed -9 is restarted too; the replicas it forked live on.
    assert stack.zygote is not None
    z_pid = stack.zygote.pid
    stack.zygote.kill()
    until(lambda: stack.zygote.pid != z_pid and stack.zygote_ready(), 120, "the zygote restarted and ready", 0.2)
    assert any(e.program == "zygote" and e.kind == "restarted" for e in stack.supervisor.events)
    assert r0.process.alive() and chat(stack) == (200, "r0")
