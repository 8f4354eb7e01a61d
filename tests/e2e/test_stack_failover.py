"""End to end on a real stack, every part its own process: Redis, two replicas of the tiny NF4
model each with its kvsync sidecar, and the gateway, driven by the real ``openai`` client.

- kill -9 the replica serving a stream: the client still gets one stream whose tokens are exactly
  the model's own greedy ``generate()``;
- kill -9 the replica that holds a multi-turn conversation (client-held history; and server-held
  history, with the gateway restarted too): the next turn is answered by the other replica, restored from kvsync (``cached_tokens`` counts
  the restored context) and equal to an uninterrupted run;
- the same with Redis killed first: the turn still succeeds, exactly, by re-prefill.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

from kvsync.testing import metric_value, wait_replicated
from loadtest.chaos import running_stack, wait_all_healthy
from unbroken.launcher import Stack, StackConfig


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = StackConfig.model_validate({
        "replicas": {"count": 2, "model_path": str(tiny_model_dir), "ready_timeout_s": 240,
                     "env": {"UNBROKEN_REPLICA__MODEL__MAX_MODEL_LEN": "1024"}},
        "gateway": {"port": 0},
        "run": {"stop_timeout_s": 10},
    })
    with running_stack(config, tmp_path_factory.mktemp("e2e-stack"), progress=lambda *_: None) as s:
        yield s


@pytest.fixture
def healthy(stack: Stack) -> Stack:
    """Every replica running again (a previous test may have killed one)."""
    for r in stack.replicas:
        if not r.process.alive():
            stack.restart_replica(r.index)
    assert wait_all_healthy(stack, 60), "the stack did not recover"
    return stack


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key, max_retries=0, timeout=120)


def chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def sidecar_url(stack: Stack, replica_id: str) -> str:
    return f"http://127.0.0.1:{stack.replica(replica_id).kvsync_port}"


def chat(stack: Stack, messages: list[dict[str, str]], session_id: str, max_tokens: int = 16,
         server_history: bool = False) -> tuple[str, list[int], str, int]:
    """One greedy non-stream turn: (replica id, token ids, text, cached prompt tokens)."""
    headers = {"X-Session-ID": session_id}
    if server_history:
        headers["X-Session-History"] = "server"
    raw = client(stack).chat.completions.with_raw_response.create(
        model="qwen", messages=messages, max_tokens=max_tokens, temperature=0, extra_headers=headers)
    r = raw.parse()
    details = r.usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    return raw.headers["X-Replica-ID"], r.choices[0].model_extra["token_ids"], r.choices[0].message.content, cached


def sidecar_token(stack: Stack) -> str:
    """The sidecars' bearer token (the stack makes one when its auth is on)."""
    return stack.secrets.sidecar_token if stack.secrets is not None else ""


def wait_for_manifest(stack: Stack, replica_id: str, before: float, timeout_s: float = 30.0) -> None:
    """Until the replica's sidecar has written a manifest after ``before`` and has nothing pending."""
    url = sidecar_url(stack, replica_id)
    deadline = time.monotonic() + timeout_s
    token = sidecar_token(stack)
    while metric_value(url, "unbroken_kvsync_manifests_written_total", token=token) <= before:
        assert time.monotonic() < deadline, f"sidecar of {replica_id} wrote no manifest"
        time.sleep(0.05)
    wait_replicated(url, timeout_s=timeout_s, token=token)


def kill_replica(stack: Stack, replica_id: str) -> None:
    stack.replica(replica_id).process.kill()
    deadline = time.monotonic() + 10
    while stack.replica(replica_id).process.alive():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_kill_9_mid_stream_gives_the_exact_greedy_text(healthy: Stack, reference) -> None:
    tok, generate = reference
    messages = [{"role": "user", "content": "Write a long story about replicas that crash and come back."}]
    max_tokens = 160
    raw = client(healthy).chat.completions.with_raw_response.create(
        model="qwen", messages=messages, max_tokens=max_tokens, temperature=0, stream=True)
    first_replica = raw.headers["X-Replica-ID"]
    ids: list[int] = []
    text = ""
    roles = 0
    killed_at = None
    last: Any = None
    for chunk in raw.parse():
        last = chunk
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        roles += delta.role is not None
        ids += chunk.choices[0].model_extra.get("token_ids") or []
        text += delta.content or ""
        if killed_at is None and len(ids) >= 8:
            killed_at = len(ids)
            kill_replica(healthy, first_replica)
    assert killed_at is not None and killed_at < max_tokens, "the stream ended before the kill"
    expected = generate(chat_ids(tok, messages), max_tokens)
    assert ids == expected, f"killed {first_replica} after {killed_at} tokens"
    assert text == tok.decode(expected, skip_special_tokens=True)
    assert roles == 1
    assert (last.model_extra.get("unbroken") or {}).get("failovers", 0) >= 1, last


@pytest.mark.parametrize("server_history", [False, True], ids=["client_history", "server_history"])
def test_next_turn_after_kill_9_is_restored_from_kvsync(healthy: Stack, reference, server_history: bool) -> None:
    tok, generate = reference
    session = f"conv-{'server' if server_history else 'client'}"
    history: list[dict[str, str]] = []
    replica_a = None
    for i, question in enumerate(["Tell me about the gateway.", "And about the replicas behind it?"]):
        history.append({"role": "user", "content": question})
        sent = history[-1:] if server_history else history
        rep, ids, content, cached = chat(healthy, sent, session, server_history=server_history)
        assert ids == generate(chat_ids(tok, history), 16)
        replica_a = replica_a or rep
        assert rep == replica_a, "session affinity moved a healthy session"
        if i == 1:
            assert cached > 0, "the second turn on the same replica reused no KV"
        history.append({"role": "assistant", "content": content})
    assert replica_a is not None
    before = metric_value(sidecar_url(healthy, replica_a), "unbroken_kvsync_manifests_written_total",
                          token=sidecar_token(healthy))
    history.append({"role": "user", "content": "Now summarise what we said."})
    # One more turn on A, so the snapshot taken at its end is the newest; then A is killed.
    rep, ids, content, _ = chat(healthy, history[-1:] if server_history else history, session,
                                  server_history=server_history)
    assert rep == replica_a and ids == generate(chat_ids(tok, history), 16)
    history.append({"role": "assistant", "content": content})
    wait_for_manifest(healthy, replica_a, before)
    killed_pid = healthy.replica(replica_a).process.pid
    kill_replica(healthy, replica_a)
    if server_history:
        healthy.restart_gateway()  # the gateway that routed the conversation is gone too

    history.append({"role": "user", "content": "What was my first question?"})
    rep_b, ids, _, cached = chat(healthy, history[-1:] if server_history else history, session,
                                  server_history=server_history)
    # Another replica, or A itself already forked again by the supervisor (the zygote restarts it
    # within a second): either way a process that never held this conversation's KV.
    assert rep_b != replica_a or healthy.replica(rep_b).process.pid != killed_pid
    context = chat_ids(tok, history)
    assert ids == generate(context, 16), "the turn after the failover differs from an uninterrupted run"
    # The previous context came from kvsync, at least up to the previous answer (whose text, sent
    # back by a client, may tokenize differently from the ids the model generated).
    assert cached >= len(chat_ids(tok, history[:-2])), (cached, len(context))
    restored = metric_value(healthy.replica(rep_b).direct_url, "unbroken_replica_kv_restores_total",
                            {"outcome": "restored"}, token=healthy.replica_token)
    assert restored >= 1


def test_every_metrics_endpoint_passes_promtool(healthy: Stack, promtool: str) -> None:
    """After the faults above: the gateway's, each replica's and each sidecar's exposition."""
    import subprocess
    import urllib.request

    chat(healthy, [{"role": "user", "content": "Count me."}], "conv-metrics")
    urls = {"gateway": (healthy.url, healthy.admin_key)}
    for r in healthy.replicas:
        urls[r.replica_id] = (r.direct_url, healthy.replica_token)
        urls[f"kvsync-{r.replica_id}"] = (sidecar_url(healthy, r.replica_id), sidecar_token(healthy))
    for name, (url, token) in urls.items():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers), timeout=10) as resp:
            text = resp.read()
        assert b"unbroken_" in text, name
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert check.returncode == 0, f"{name}: {check.stdout.decode()}{check.stderr.decode()}"
    with urllib.request.urlopen(urllib.request.Request(healthy.url + "/metrics",
                                                       headers=healthy.auth_headers(admin=True)), timeout=10) as resp:
        gateway_text = resp.read().decode()
    assert 'route="/v1/chat/completions",status="200"}' in gateway_text


def test_with_redis_killed_the_turn_after_a_failover_is_recomputed(healthy: Stack, reference) -> None:
    """Last in the module: Redis stays down (the stack's sidecars keep serving without it)."""
    tok, generate = reference
    assert healthy.redis is not None
    healthy.redis.kill()
    history = [{"role": "user", "content": "Redis is gone; do you still remember me?"}]
    rep_a, ids, content, _ = chat(healthy, history, "conv-no-redis")
    assert ids == generate(chat_ids(tok, history), 16)
    history += [{"role": "assistant", "content": content}, {"role": "user", "content": "Good. Go on."}]
    time.sleep(0.5)  # give the sidecar its chance to try (and fail) to write
    kill_replica(healthy, rep_a)
    rep_b, ids, _, cached = chat(healthy, history, "conv-no-redis")
    assert rep_b != rep_a
    assert ids == generate(chat_ids(tok, history), 16)
    assert cached == 0, "nothing could have been restored without Redis"
