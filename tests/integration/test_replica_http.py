"""A real replica process on the tiny NF4 model, driven by the real ``openai`` client: greedy
tokens equal the model's own ``generate()``, streams, completions, models, OpenAI error types,
stop strings, resume, sessions, disconnects, bad input beside a good stream, and SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Iterator

import aiohttp
import openai
import pytest
import torch

from unbroken.procs import ManagedProcess, free_port, python_module_cmd

MSGS = [{"role": "user", "content": "Tell me a story about a small robot."}]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with non-zero weights, made at test time."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(11)
    peft_model = get_peft_model(base, LoraConfig(
        r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("adapter-support")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def replica(tiny_model_dir: Path, adapter_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ManagedProcess]]:
    port = free_port()
    log = tmp_path_factory.mktemp("replica-http") / "replica.log"
    proc = ManagedProcess(
        "replica",
        python_module_cmd("replica", "--model", str(tiny_model_dir), "--port", str(port),
                          "--quantization", "nf4", "--replica-id", "it-replica"),
        log_path=log,
        env={"UNBROKEN_REPLICA__MODEL__NUM_THREADS": "1", "UNBROKEN_REPLICA__MODEL__MAX_MODEL_LEN": "512",
             "UNBROKEN_REPLICA__SERVER__DRAIN_TIMEOUT_S": "30",
             "UNBROKEN_REPLICA__MODEL__ADAPTERS": f"{{support: '{adapter_dir}'}}"},
        ready_url=f"http://127.0.0.1:{port}/health",
    ).start()
    try:
        proc.wait_ready(timeout_s=180)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.stop(timeout_s=20)


def chat_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def aclient(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_chat_greedy_equals_generate(replica, reference):
    url, _ = replica
    tok, generate = reference
    raw = client(url).chat.completions.with_raw_response.create(model="qwen", messages=MSGS, max_tokens=24,
                                                                temperature=0)
    r = raw.parse()
    assert raw.headers["X-Replica-ID"] == "it-replica"
    expected = generate(chat_ids(tok, MSGS), 24)
    ids = r.choices[0].model_extra["token_ids"]
    assert ids == expected
    assert r.choices[0].message.content == tok.decode(ids, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(chat_ids(tok, MSGS)) and r.usage.completion_tokens == len(ids)


def test_streams_and_completions_equal_generate_under_batching(replica, reference):
    url, _ = replica
    tok, generate = reference
    prompts = ["Hello there", "The quick brown fox jumps over the lazy dog and then",
               "def add(a, b):", "When the gateway sees a stalled stream it"]

    async def one(prompt: str, stream: bool) -> tuple[list[int], str, str | None]:
        c = aclient(url)
        if not stream:
            r = await c.completions.create(model="qwen", prompt=prompt, max_tokens=20, temperature=0)
            return r.choices[0].model_extra["token_ids"], r.choices[0].text, r.choices[0].finish_reason
        s = await c.completions.create(model="qwen", prompt=prompt, max_tokens=20, temperature=0, stream=True)
        ids, text, reason = [], "", None
        async for chunk in s:
            ids += chunk.choices[0].model_extra["token_ids"]
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return ids, text, reason

    health_latencies_s: list[float] = []

    async def poll_health(done: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as s:
            while not done.is_set():
                t0 = time.monotonic()
                async with s.get(url + "/health") as r:
                    assert r.status == 200
                health_latencies_s.append(time.monotonic() - t0)
                await asyncio.sleep(0.02)

    async def run_all():
        done = asyncio.Event()
        poller = asyncio.create_task(poll_health(done))
        try:
            return await asyncio.gather(*[one(p, i % 2 == 0) for i, p in enumerate(prompts)],
                                        *[one(p, i % 2 == 1) for i, p in enumerate(prompts)])
        finally:
            done.set()
            await poller

    results = asyncio.run(run_all())
    # The replica's event loop never blocks on the model: /health answers while 8 requests run.
    assert len(health_latencies_s) >= 5 and max(health_latencies_s) < 1.0, max(health_latencies_s)
    expected_by_prompt = {p: generate(tok(p)["input_ids"], 20) for p in prompts}
    for i, (ids, text, reason) in enumerate(results):
        prompt = prompts[i % len(prompts)]
        assert ids == expected_by_prompt[prompt], prompt
        assert text == tok.decode(ids, skip_special_tokens=True)
        assert reason == ("length" if len(ids) == 20 and ids[-1] not in (0, 2) else "stop")


def test_chat_stream_format(replica, reference):
    url, _ = replica
    tok, generate = reference
    chunks = list(client(url).chat.completions.create(
        model="qwen", messages=MSGS, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    body = [c for c in chunks if c.choices]
    ids = [i for c in body for i in c.choices[0].model_extra["token_ids"]]
    assert ids == generate(chat_ids(tok, MSGS), 12)
    assert "".join(c.choices[0].delta.content or "" for c in body) == tok.decode(ids, skip_special_tokens=True)
    assert body[-1].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)


def test_models_and_error_types(replica):
    url, _ = replica
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["qwen", "qwen:support"]
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="qwen:missing", messages=MSGS)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="qwen", messages=MSGS, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.chat.completions.create(model="qwen", messages=MSGS, top_p=3)
    assert e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="qwen", prompt="word " * 600)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="qwen", messages=MSGS, max_tokens=600)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.with_raw_response.create(model="qwen", messages=[])


def test_adapter_equals_peft_generate(replica, reference, tiny_model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    url, _ = replica
    tok, _ = reference
    c = client(url)
    lora = c.completions.create(model="qwen:support", prompt="Hello there", max_tokens=16, temperature=0,
                                extra_body={"ignore_eos": True})
    base = c.completions.create(model="qwen", prompt="Hello there", max_tokens=16, temperature=0,
                                extra_body={"ignore_eos": True})
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name="support").eval()
    ids = torch.tensor([tok("Hello there")["input_ids"]])
    with torch.inference_mode():
        expected = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                       do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert lora.choices[0].model_extra["token_ids"] == expected
    assert lora.choices[0].model_extra["token_ids"] != base.choices[0].model_extra["token_ids"]


def test_stop_string(replica):
    url, _ = replica
    c = client(url)
    full = c.completions.create(model="qwen", prompt="Hello there", max_tokens=30, temperature=0,
                                extra_body={"ignore_eos": True})
    text = full.choices[0].text
    assert len(text) > 12
    stop = text[6:10]
    cut = text.index(stop)
    r = c.completions.create(model="qwen", prompt="Hello there", max_tokens=30, temperature=0, stop=[stop],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == text[:cut] and r.choices[0].finish_reason == "stop"
    ids = r.choices[0].model_extra["token_ids"]
    assert ids == full.choices[0].model_extra["token_ids"][:len(ids)]


def test_resume_continues_exactly(replica):
    url, _ = replica
    c = client(url)
    full = c.chat.completions.create(model="qwen", messages=MSGS, max_tokens=16, temperature=0.8, seed=7,
                                     extra_body={"ignore_eos": True})
    ids = full.choices[0].model_extra["token_ids"]
    assert len(ids) == 16
    resumed = list(c.chat.completions.create(model="qwen", messages=MSGS, max_tokens=16, temperature=0.8,
                                             seed=7, stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True, "resume_token_ids": ids[:5]}))
    new = [i for ch in resumed if ch.choices for i in ch.choices[0].model_extra["token_ids"]]
    assert ids[:5] + new == ids
    assert resumed[-1].usage.completion_tokens == 16


def test_session_reuses_kept_kv(replica):
    url, _ = replica
    c = client(url)
    headers = {"X-Session-ID": "it-session-1"}
    first = c.chat.completions.create(model="qwen", messages=MSGS, max_tokens=8, temperature=0, extra_headers=headers)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second_msgs = MSGS + [{"role": "assistant", "content": first.choices[0].message.content},
                          {"role": "user", "content": "And then?"}]
    second = c.chat.completions.create(model="qwen", messages=second_msgs, max_tokens=8, temperature=0,
                                       extra_headers=headers)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    # Server-held history: only the new message is sent.
    third = c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "More."}], max_tokens=4,
                                      temperature=0, extra_headers={**headers, "X-Session-History": "server"})
    assert third.usage.prompt_tokens > second.usage.prompt_tokens


def _state(url: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(url + "/state", timeout=5) as r:
        return json.loads(r.read())


def test_disconnect_aborts_and_bad_input_does_not_disturb(replica, reference):
    url, _ = replica
    tok, generate = reference

    async def leave_early() -> None:
        body = {"model": "qwen", "prompt": "Hello", "max_tokens": 480, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/completions", json=body) as r:
                n = 0
                async for line in r.content:
                    n += line.startswith(b"data:")
                    if n >= 3:
                        return

    async def good() -> list[int]:
        s = await aclient(url).chat.completions.create(model="qwen", messages=MSGS, max_tokens=20, temperature=0,
                                                       stream=True)
        return [i async for ch in s for i in ch.choices[0].model_extra["token_ids"]]

    async def bad(i: int) -> int:
        bodies = [b"{nope", b'{"model": "qwen", "messages": [{"role": "user", "content": 3}]}',
                  b'{"model": "qwen", "prompt": "x", "temperature": -1}', b'{"model": "x", "prompt": "x"}']
        path = "/v1/completions" if i % 2 else "/v1/chat/completions"
        async with aiohttp.ClientSession() as s:
            async with s.post(url + path, data=bodies[i % 4]) as r:
                return r.status

    async def run():
        return await asyncio.gather(good(), leave_early(), *[bad(i) for i in range(12)])

    results = asyncio.run(run())
    left_s = time.monotonic()
    assert results[0] == generate(chat_ids(tok, MSGS), 20)
    assert all(400 <= s < 500 for s in results[2:])
    # 480 tokens take several seconds on this model; an aborted request ends at once.
    deadline = left_s + 2.0
    state = _state(url)
    while state["num_running"] + state["num_waiting"] > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        state = _state(url)
    assert state["num_running"] == 0 and state["num_waiting"] == 0, "the abandoned stream was not aborted"
    assert _metric(url, "unbroken_replica_client_disconnects_total") >= 1


def _metric(url: str, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_state_and_metrics(replica):
    url, proc = replica
    state = _state(url)
    assert state["replica_id"] == "it-replica" and state["pid"] == proc.pid and state["status"] == "ready"
    assert state["quantization"] == "nf4" and state["dtype"] == "float32" and state["device"] == "cpu"
    assert state["max_model_len"] == 512 and state["kv_bytes_per_token"] > 0
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "unbroken_replica_time_to_first_token_seconds_bucket" in text
    assert "unbroken_replica_generated_tokens_total" in text
    assert 'unbroken_replica_requests_total{route="/v1/chat/completions",status="200"}' in text


@pytest.mark.slow
def test_bench_http_overhead(replica, tiny_model_dir):
    """Benchmark (prints a table): 32 concurrent greedy streams of 64 tokens through the replica's
    HTTP layer (SSE, detokenizer, metrics) against the same requests on an in-process AsyncEngine
    with the same settings. Run: pytest -m slow -s tests/integration/test_replica_http.py -k bench"""
    import statistics

    import orjson

    from replica.config import ReplicaConfig
    from replica.engine import AsyncEngine
    from replica.protocol import GenerationRequest, SamplingParams

    url, _ = replica
    num_requests, num_tokens = 32, 64
    prompts = [f"Request {i}: tell me about replicas and gateways." for i in range(num_requests)]

    async def over_http() -> tuple[float, list[float], int]:
        t0 = time.monotonic()
        ttfts: list[float] = []

        async def one(session: aiohttp.ClientSession, prompt: str) -> int:
            body = {"model": "qwen", "prompt": prompt, "max_tokens": num_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            n = 0
            async with session.post(url + "/v1/completions", json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        ids = orjson.loads(line[6:])["choices"][0]["token_ids"]
                        if ids and n == 0:
                            ttfts.append(time.monotonic() - t0)
                        n += len(ids)
            return n

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            counts = await asyncio.gather(*[one(session, p) for p in prompts])
        return time.monotonic() - t0, ttfts, sum(counts)

    async def in_process() -> tuple[float, list[float], int]:
        cfg = ReplicaConfig.model_validate({"model": {"path": str(tiny_model_dir), "num_threads": 1,
                                                      "max_model_len": 512}})
        engine = AsyncEngine(cfg)
        engine.load(progress=lambda _: None)
        await engine.start()
        try:
            t0 = time.monotonic()
            ttfts: list[float] = []

            async def one(i: int, prompt: str) -> int:
                req = GenerationRequest(f"b{i}", engine.tokenizer(prompt)["input_ids"],
                                        SamplingParams(max_tokens=num_tokens, temperature=0, ignore_eos=True))
                n = 0
                async for out in engine.generate(req):
                    if out.token_id is not None:
                        if n == 0:
                            ttfts.append(time.monotonic() - t0)
                        n += 1
                return n

            counts = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
            return time.monotonic() - t0, ttfts, sum(counts)
        finally:
            await engine.stop()

    asyncio.run(over_http())  # warm-up
    http_s, http_ttft, http_n = asyncio.run(over_http())
    eng_s, eng_ttft, eng_n = asyncio.run(in_process())
    assert http_n == eng_n == num_requests * num_tokens
    rows = [("AsyncEngine in-process", eng_n / eng_s, statistics.median(eng_ttft)),
            ("HTTP SSE (replica process)", http_n / http_s, statistics.median(http_ttft))]
    print(f"\n{num_requests} streams x {num_tokens} tokens, tiny NF4 model, CPU, 1 torch thread")
    print(f"{'path':<28} {'tokens/s':>9} {'TTFT p50 s':>11}")
    for name, tps, ttft in rows:
        print(f"{name:<28} {tps:>9.0f} {ttft:>11.3f}")
    print(f"HTTP / in-process throughput: {rows[1][1] / rows[0][1]:.2f}")


def test_sigterm_drain_finishes_the_running_stream(replica):
    """Last in the module: it ends the replica."""
    url, proc = replica

    async def run():
        c = aclient(url)
        s = await c.completions.create(model="qwen", prompt="Hello", max_tokens=150, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
        it = aiter(s)
        first = await anext(it)
        proc.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/completions", json={"model": "qwen", "prompt": "x"}) as r:
                refused = (r.status, r.headers.get("Retry-After"), (await r.json())["error"]["code"])
            async with session.get(url + "/health") as r:
                health = r.status
        ids = list(first.choices[0].model_extra["token_ids"])
        reason = None
        async for chunk in it:
            ids += chunk.choices[0].model_extra["token_ids"]
            reason = chunk.choices[0].finish_reason or reason
        return refused, health, ids, reason

    refused, health, ids, reason = asyncio.run(run())
    assert refused[0] == 503 and refused[1] is not None and refused[2] == "draining"
    assert health == 503
    assert len(ids) == 150 and reason == "length"
    assert proc.proc is not None
    assert proc.proc.wait(timeout=30) == 0
