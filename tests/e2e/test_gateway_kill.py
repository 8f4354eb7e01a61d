"""Streams that survive the loss of a gateway, on a real stack: Redis, two replicas of the tiny NF4
model, and two gateways (``unbroken up --gateways 2``), every part its own process.

- kill -9 the gateway serving a stream after 40 tokens: the ``openai`` SDK with ``unbroken.client``
  ends with exactly the model's own greedy ``generate()`` (text and token ids), one role chunk;
- a raw POST with ``Last-Event-ID`` to the other gateway continues exactly after that event;
- an unknown ``Last-Event-ID`` gets a 4xx in OpenAI's error form and starts nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import httpx2
import openai
import orjson
import pytest

import unbroken.client
from loadtest.chaos import running_stack, wait_all_healthy
from unbroken.launcher import Stack, StackConfig

MESSAGES = [{"role": "user", "content": "Write a long story about gateways that die and come back."}]
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = StackConfig.model_validate({
        "replicas": {"count": 2, "model_path": str(tiny_model_dir), "ready_timeout_s": 240,
                     "env": {"UNBROKEN_REPLICA__MODEL__MAX_MODEL_LEN": "1024"}},
        "kvsync": {"enabled": False},
        "gateway": {"port": 0, "count": 2},
        "run": {"stop_timeout_s": 10},
    })
    with running_stack(config, tmp_path_factory.mktemp("e2e-gw-stack"), progress=lambda *_: None) as s:
        yield s


@pytest.fixture
def healthy(stack: Stack) -> Stack:
    """Both gateways running (a previous test killed one)."""
    for i, g in enumerate(stack.gateways):
        if not g.alive():
            stack.restart_gateway(index=i)
    assert wait_all_healthy(stack, 60), "the stack did not recover"
    return stack


def chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def kill_gateway(stack: Stack, index: int) -> None:
    proc = stack.gateways[index]
    proc.kill()
    assert not proc.alive()


def test_kill_9_the_gateway_mid_stream_sdk_gets_the_exact_greedy_text(healthy: Stack, reference) -> None:
    tok, generate = reference
    urls = [u + "/v1" for u in healthy.urls]
    client = openai.OpenAI(base_url=urls[0], api_key=healthy.api_key, max_retries=0, timeout=120,
                           http_client=unbroken.client.http_client(urls=urls))
    raw = client.chat.completions.with_raw_response.create(model="qwen", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                           temperature=0, stream=True)
    ids: list[int] = []
    text = ""
    roles = 0
    killed_at = None
    stream_ids = set()
    for chunk in raw.parse():
        stream_ids.add(chunk.id)
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        roles += delta.role is not None
        ids += chunk.choices[0].model_extra.get("token_ids") or []
        text += delta.content or ""
        if killed_at is None and len(ids) >= 40:
            killed_at = len(ids)
            kill_gateway(healthy, 0)  # the gateway serving this stream: the client's first URL
    assert killed_at is not None and killed_at < MAX_TOKENS, "the stream ended before the kill"
    expected = generate(chat_ids(tok, MESSAGES), MAX_TOKENS)
    assert ids == expected, f"gateway killed after {killed_at} tokens"
    assert text == tok.decode(expected, skip_special_tokens=True)
    assert roles == 1 and len(stream_ids) == 1
    # The next request goes to the live gateway at once (gateway 0 refuses connections).
    again = client.chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=8, temperature=0)
    assert again.choices[0].model_extra["token_ids"] == expected[:8]


def _sse(text: str) -> list[tuple[str | None, Any]]:
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        eid, data = None, None
        for line in block.split("\n"):
            if line.startswith("id:"):
                eid = line[3:].strip()
            elif line.startswith("data:"):
                payload = line[5:].strip()
                data = payload if payload == "[DONE]" else orjson.loads(payload)
        out.append((eid, data))
    return out


def _ids(events: list[tuple[str | None, Any]]) -> list[int]:
    return [t for _, e in events if isinstance(e, dict) for ch in e.get("choices") or []
            for t in ch.get("token_ids") or []]


def test_raw_post_with_last_event_id_continues_exactly(healthy: Stack, reference) -> None:
    tok, generate = reference
    expected = generate(chat_ids(tok, MESSAGES), MAX_TOKENS)
    body = {"model": "qwen", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    rid = "raw-" + os.urandom(6).hex()
    headers = {"X-Request-ID": rid, **healthy.auth_headers()}
    got = ""
    with httpx2.Client(timeout=120) as http:
        with http.stream("POST", healthy.urls[0] + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            try:
                for chunk in r.iter_text():
                    got += chunk
                    whole = got[:got.rfind("\n\n") + 2]
                    if len(_ids(_sse(whole))) >= 40 and healthy.gateways[0].alive():
                        kill_gateway(healthy, 0)
            except httpx2.HTTPError:
                pass  # the gateway is gone
        first = _sse(got[:got.rfind("\n\n") + 2])
        assert all(eid is not None and eid.startswith(rid + ":") for eid, _ in first)
        last = first[-1][0]
        assert last is not None and 40 <= len(_ids(first)) < MAX_TOKENS
        r2 = http.post(healthy.urls[1] + "/v1/chat/completions", json=body,
                       headers={**headers, "Last-Event-ID": last})
        assert r2.status_code == 200, r2.text
        rest = _sse(r2.text)
    assert rest[0][0] == f"{rid}:{len(_ids(first)) + 1}" or len(_ids(rest[:1])) > 1  # the very next event
    assert _ids(first) + _ids(rest) == expected
    assert rest[-1][1] == "[DONE]"
    assert not any("role" in (ch.get("delta") or {}) for _, e in rest if isinstance(e, dict)
                   for ch in e.get("choices") or [])
    assert {e["id"] for _, e in first + rest if isinstance(e, dict)} == {first[0][1]["id"]}


def test_unknown_last_event_id_gets_a_4xx(healthy: Stack) -> None:
    body = {"model": "qwen", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx2.Client(timeout=30) as http:
        r = http.post(healthy.urls[1] + "/v1/chat/completions", json=body,
                      headers={"X-Request-ID": "never-seen", "Last-Event-ID": "never-seen:12",
                               **healthy.auth_headers()})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "stream_not_found" and err["type"] == "invalid_request_error" and err["message"]
