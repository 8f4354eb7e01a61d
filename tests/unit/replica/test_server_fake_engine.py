"""The replica's HTTP layer in-process (aiohttp test server on a free port) over a stand-in engine
with AsyncEngine's interface that emits a fixed token script from the tiny model's tokenizer.
Clients are the real ``openai`` SDK and raw aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import openai
import orjson
import pytest
import torch
from aiohttp.test_utils import TestServer

from replica.config import ReplicaConfig
from replica.engine import EngineStats
from replica.protocol import FinishReason, GenerationRequest, KVIdentity, KVSnapshot, TokenOutput
from replica.server import RUNTIME, create_app
from unbroken.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError

SCRIPT = "Hello wörld, 日本 then stop here. The end"
pytestmark = pytest.mark.asyncio


class FakeEngine:
    """AsyncEngine's interface; output position k is token ``script[k]``; the script ends in EOS."""

    def __init__(self, tokenizer: Any, *, token_delay_s: float = 0.0, max_model_len: int = 256) -> None:
        self.tokenizer = tokenizer
        self.served_name = "qwen"
        self.adapter_names = ["support"]
        self.quantization, self.dtype, self.device = "nf4", "float32", "cpu"
        self.max_model_len = max_model_len
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.eos_token_ids = {self.eos}
        self.script = list(tokenizer(SCRIPT)["input_ids"]) + [self.eos]
        self.token_delay_s = token_delay_s
        self.requests: list[GenerationRequest] = []
        self.aborted: set[str] = set()
        self.completed: set[str] = set()
        self.transcripts: dict[str, list[dict[str, Any]]] = {}
        self.turns: list[tuple[str, list[dict[str, Any]]]] = []
        self.kept: dict[str, KVSnapshot] = {}
        self.started = self.stopped = False
        self.num_running = 0
        self.fail_after_tokens: int | None = None  # end requests with FinishReason.ERROR after N tokens

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def identity(self, adapter: str | None) -> KVIdentity:
        return KVIdentity("qwen", "r1", adapter, "float32", 2, 1, 4)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenOutput]:
        if request.adapter is not None and request.adapter not in self.adapter_names:
            raise ModelNotFoundError(f"adapter {request.adapter!r} is not loaded", param="model")
        if len(request.prompt_token_ids) + len(request.resume_token_ids) >= self.max_model_len:
            raise ContextLengthError("too long", param="messages")
        self.requests.append(request)
        self.num_running += 1
        done = False
        try:
            sp = request.sampling
            for k in range(len(request.resume_token_ids), sp.max_tokens):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                if self.fail_after_tokens is not None and k >= self.fail_after_tokens:
                    done = True
                    yield TokenOutput(request.request_id, None, FinishReason.ERROR, error="engine step failed")
                    return
                token = self.script[k % len(self.script)]
                reason = None
                if token == self.eos and not sp.ignore_eos:
                    reason = FinishReason.STOP
                elif k + 1 >= sp.max_tokens:
                    reason = FinishReason.LENGTH
                first = k == len(request.resume_token_ids)
                if reason is not None:
                    done = True
                yield TokenOutput(request.request_id, token, reason,
                                  num_cached_prompt_tokens=3 if first and request.session_id else 0)
                if reason is not None:
                    self.completed.add(request.request_id)
                    return
        finally:
            self.num_running -= 1
            if not done:
                self.aborted.add(request.request_id)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=self.num_running, num_waiting=0, kv_bytes_used=1024,
                           kv_bytes_free=4096, kv_bytes_per_token=64, device_memory_free_bytes=10**9,
                           tokens_per_s=12.5, sessions=sorted(self.kept), num_preemptions=2,
                           restore_outcomes={"restored": 1, "missing": 2}, num_restored_tokens=64)

    async def export_session(self, session_id: str) -> KVSnapshot | None:
        return self.kept.get(session_id)

    async def import_session(self, snapshot: KVSnapshot) -> int:
        if snapshot.identity != self.identity(snapshot.identity.adapter):
            raise InvalidRequestError("identity mismatch", param="identity")
        self.kept[snapshot.session_id] = snapshot
        return len(snapshot.token_ids)

    async def session_transcript(self, session_id: str, adapter: str | None = None) -> list[dict[str, Any]] | None:
        return self.transcripts.get(session_id)

    def finish_turn(self, session_id: str, transcript: list[dict[str, Any]]) -> None:
        self.turns.append((session_id, transcript))
        self.transcripts[session_id] = transcript


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@contextlib.asynccontextmanager
async def serving(engine: FakeEngine, **config: Any) -> AsyncIterator[tuple[str, Any]]:
    cfg = ReplicaConfig.model_validate(config)
    app = create_app(cfg, engine, replica_id="r-test")
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", app[RUNTIME]
    finally:
        await server.close()


def client(url: str, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                              timeout=20, **kw)


def script_text(engine: FakeEngine, n: int | None = None) -> str:
    ids = engine.script[:-1] if n is None else engine.script[:n]
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


async def test_chat_non_stream(tokenizer):
    engine = FakeEngine(tokenizer)
    async with serving(engine) as (url, _):
        raw = await client(url).chat.completions.with_raw_response.create(
            model="qwen", messages=[{"role": "user", "content": "hi"}], temperature=0)
        r = raw.parse()
        assert raw.headers["X-Replica-ID"] == "r-test"
        assert r.choices[0].message.content == SCRIPT
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].model_extra["token_ids"] == engine.script  # EOS included, text hidden
        assert r.usage.completion_tokens == len(engine.script)
        req = engine.requests[0]
        expected = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                 tokenize=False)
        assert req.prompt_token_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
        assert r.usage.prompt_tokens == len(req.prompt_token_ids)
        assert req.sampling.temperature == 0 and req.adapter is None
        assert req.sampling.max_tokens == engine.max_model_len - len(req.prompt_token_ids)
        assert engine.started
    assert engine.stopped


async def test_chat_stream_chunks_carry_their_token_ids(tokenizer):
    engine = FakeEngine(tokenizer)
    async with serving(engine) as (url, _):
        stream = await client(url).chat.completions.create(
            model="qwen", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = [c for c in chunks if c.choices]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in content)
    ids = [i for c in content for i in c.choices[0].model_extra["token_ids"]]
    assert text == SCRIPT and ids == engine.script
    for c in content:  # each delta is exactly the text of its ids
        piece_ids = c.choices[0].model_extra["token_ids"]
        assert (c.choices[0].delta.content or "") == tokenizer.decode(piece_ids, skip_special_tokens=True)
        assert "\ufffd" not in (c.choices[0].delta.content or "")
    assert [c.choices[0].finish_reason for c in content].count("stop") == 1
    assert content[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(engine.script)


async def test_completions_stream_and_not_with_id_prompt(tokenizer):
    engine = FakeEngine(tokenizer)
    async with serving(engine) as (url, _):
        c = client(url)
        r = await c.completions.create(model="qwen", prompt=[5, 6, 7], max_tokens=4)
        assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
        assert r.choices[0].text == script_text(engine, 4)
        assert engine.requests[-1].prompt_token_ids == [5, 6, 7]
        stream = await c.completions.create(model="qwen", prompt="hello there", max_tokens=6, stream=True)
        chunks = [x async for x in stream]
        assert "".join(x.choices[0].text for x in chunks) == script_text(engine, 6)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert engine.requests[-1].prompt_token_ids == tokenizer("hello there")["input_ids"]


async def test_models_and_adapters(tokenizer):
    engine = FakeEngine(tokenizer)
    async with serving(engine) as (url, _):
        c = client(url)
        models = await c.models.list()
        assert [m.id for m in models.data] == ["qwen", "qwen:support"]
        await c.chat.completions.create(model="qwen:support", messages=[{"role": "user", "content": "x"}],
                                        max_tokens=2)
        assert engine.requests[-1].adapter == "support"
        with pytest.raises(openai.NotFoundError) as e:
            await c.chat.completions.create(model="qwen:nope", messages=[{"role": "user", "content": "x"}])
        assert e.value.code == "model_not_found" and "qwen:support" in e.value.message
        with pytest.raises(openai.NotFoundError):
            await c.completions.create(model="llama", prompt="x")


async def test_client_errors_are_openai_errors(tokenizer):
    engine = FakeEngine(tokenizer, max_model_len=64)
    msgs = [{"role": "user", "content": "hi"}]
    async with serving(engine, server={"max_body_bytes": 4096}) as (url, _):
        c = client(url)
        with pytest.raises(openai.BadRequestError) as e:
            await c.chat.completions.create(model="qwen", messages=msgs, n=2)
        assert e.value.body["param"] == "n"
        with pytest.raises(openai.UnprocessableEntityError) as e:
            await c.chat.completions.create(model="qwen", messages=msgs, temperature="hot")  # type: ignore[arg-type]
        assert e.value.body["param"] == "temperature"
        with pytest.raises(openai.BadRequestError) as e:
            await c.chat.completions.create(model="qwen", messages=msgs, max_tokens=100)
        assert e.value.code == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError) as e:
            await c.completions.create(model="qwen", prompt=list(range(70)))
        assert e.value.code == "context_length_exceeded"
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/chat/completions", data=b'{"model": "qwen", "mess') as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["type"] == "invalid_request_error"
            async with s.post(url + "/v1/chat/completions", data=b"[1, 2]") as r:
                assert r.status == 400
            big = orjson.dumps({"model": "qwen", "messages": [{"role": "user", "content": "x" * 5000}]})
            async with s.post(url + "/v1/chat/completions", data=big) as r:
                assert r.status == 413 and (await r.json())["error"]["code"] == "payload_too_large"
            async with s.get(url + "/v1/nothing") as r:
                assert r.status == 404 and "error" in await r.json()
    assert engine.requests == []  # nothing bad reached the engine


async def test_engine_failure_before_and_after_the_first_byte(tokenizer):
    engine = FakeEngine(tokenizer)
    async with serving(engine) as (url, _):
        c = client(url)
        engine.fail_after_tokens = 0
        with pytest.raises(openai.InternalServerError) as e:
            await c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "x"}], stream=True)
        assert e.value.code == "internal_error" and "engine step failed" in e.value.message
        engine.fail_after_tokens = 3
        body = {"model": "qwen", "messages": [{"role": "user", "content": "x"}], "stream": True}
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                events = [line[6:].strip() for line in (await r.text()).splitlines() if line.startswith("data: ")]
        assert b"[DONE]" not in [e.encode() for e in events]  # a relay must see a broken stream
        error = orjson.loads(events[-1])["error"]
        assert error["code"] == "internal_error" and "engine step failed" in error["message"]
        ids = [i for e in events[:-1] for i in orjson.loads(e)["choices"][0]["token_ids"]]
        assert ids == engine.script[:len(ids)] and len(ids) <= 3
        with pytest.raises(openai.InternalServerError):  # non-stream: a 500 after the tokens
            await c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "x"}])


async def test_stop_string_truncates_and_aborts_the_engine_request(tokenizer):
    engine = FakeEngine(tokenizer)
    async with serving(engine) as (url, _):
        c = client(url)
        r = await c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "x"}],
                                            stop=["stop here"])
        assert r.choices[0].message.content == "Hello wörld, 日本 then "
        assert r.choices[0].finish_reason == "stop"
        assert engine.requests[-1].request_id in engine.aborted
        stream = await c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "x"}],
                                                 stop="wörld", stream=True)
        chunks = [x async for x in stream]
        assert "".join(x.choices[0].delta.content or "" for x in chunks) == "Hello "
        assert chunks[-1].choices[0].finish_reason == "stop"


async def test_client_disconnect_mid_stream_aborts_the_request(tokenizer):
    engine = FakeEngine(tokenizer, token_delay_s=0.05)
    async with serving(engine) as (url, rt):
        body = {"model": "qwen", "messages": [{"role": "user", "content": "x"}], "stream": True,
                "max_tokens": 200, "ignore_eos": True}
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                n = 0
                async for line in r.content:
                    n += line.startswith(b"data:")
                    if n >= 3:
                        break
        deadline = time.monotonic() + 5
        while not engine.aborted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert engine.requests[0].request_id in engine.aborted
        assert engine.num_running == 0 and rt.num_active == 0


async def test_sessions_finish_turn_and_server_history(tokenizer):
    engine = FakeEngine(tokenizer)
    async with serving(engine) as (url, _):
        c = client(url)
        msgs = [{"role": "user", "content": "first"}]
        r = await c.chat.completions.create(model="qwen", messages=msgs, max_tokens=3,
                                            extra_headers={"X-Session-ID": "s1"})
        assert engine.requests[-1].session_id == "s1"
        assert r.usage.prompt_tokens_details.cached_tokens == 3
        assert engine.turns[-1] == ("s1", msgs + [{"role": "assistant", "content": script_text(engine, 3)}])
        await c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "second"}],
                                        max_tokens=2, extra_headers={"X-Session-ID": "s1",
                                                                     "X-Session-History": "server"})
        expected = engine.turns[0][1] + [{"role": "user", "content": "second"}]
        prompt = tokenizer.apply_chat_template(expected, add_generation_prompt=True, tokenize=False)
        assert engine.requests[-1].prompt_token_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert engine.turns[-1][1][:-1] == expected
        with pytest.raises(openai.BadRequestError):
            await c.chat.completions.create(model="qwen", messages=msgs,
                                            extra_headers={"X-Session-History": "server"})
        # With the history on the server, a request may bring no new message (not so without).
        await c.chat.completions.create(model="qwen", messages=[], max_tokens=2,
                                        extra_headers={"X-Session-ID": "s1", "X-Session-History": "server"})
        assert engine.requests[-1].prompt_token_ids == tokenizer(tokenizer.apply_chat_template(
            engine.turns[1][1], add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
        with pytest.raises(openai.BadRequestError):
            await c.chat.completions.create(model="qwen", messages=[], extra_headers={"X-Session-ID": "s1"})
        with pytest.raises(openai.BadRequestError):
            await c.chat.completions.create(model="qwen", messages=[], extra_headers={
                "X-Session-ID": "never-seen", "X-Session-History": "server"})
        n = len(engine.turns)
        await c.chat.completions.create(model="qwen", messages=msgs, max_tokens=2)
        assert len(engine.turns) == n  # no session, no turn
        await c.completions.create(model="qwen", prompt=[5, 6], max_tokens=2, extra_headers={"X-Session-ID": "s2"})
        assert engine.turns[-1] == ("s2", [{"role": "user", "content": tokenizer.decode([5, 6])},
                                           {"role": "assistant", "content": script_text(engine, 2)}])


async def test_large_prompt_is_tokenized_off_the_loop(tokenizer):
    engine = FakeEngine(tokenizer, max_model_len=100_000)
    text = "The gateway routes each request. " * 2000  # beyond LARGE_PROMPT_CHARS
    async with serving(engine) as (url, _):
        r = await client(url).completions.create(model="qwen", prompt=text, max_tokens=2)
    assert r.usage.prompt_tokens == len(tokenizer(text)["input_ids"])
    assert engine.requests[-1].prompt_token_ids == tokenizer(text)["input_ids"]


async def test_resume_token_ids_continue_and_count(tokenizer):
    engine = FakeEngine(tokenizer)
    async with serving(engine) as (url, _):
        c = client(url)
        full = await c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "x"}],
                                               max_tokens=10)
        full_ids = full.choices[0].model_extra["token_ids"]
        resume = full_ids[:4]
        stream = await c.chat.completions.create(
            model="qwen", messages=[{"role": "user", "content": "x"}], max_tokens=10, stream=True,
            stream_options={"include_usage": True}, extra_body={"resume_token_ids": resume})
        chunks = [x async for x in stream]
        new_ids = [i for x in chunks if x.choices for i in x.choices[0].model_extra["token_ids"]]
        assert resume + new_ids == full_ids
        text = "".join(x.choices[0].delta.content or "" for x in chunks if x.choices)
        assert tokenizer.decode(resume) + text == full.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == 10
        assert engine.requests[-1].resume_token_ids == resume
        # Every token was delivered already: only the end is sent, without touching the engine.
        n = len(engine.requests)
        r = await c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "x"}],
                                            max_tokens=10, extra_body={"resume_token_ids": full_ids})
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == ""
        assert r.usage.completion_tokens == 10 and len(engine.requests) == n


async def test_shared_token(tokenizer):
    engine = FakeEngine(tokenizer)
    async with serving(engine, server={"shared_token": "s3cret"}) as (url, _):
        with pytest.raises(openai.AuthenticationError):
            await client(url).models.list()
        with pytest.raises(openai.AuthenticationError):
            await client(url, api_key="wrong").chat.completions.create(
                model="qwen", messages=[{"role": "user", "content": "x"}])
        assert [m.id for m in (await client(url, api_key="s3cret").models.list()).data][0] == "qwen"
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/health") as r:
                assert r.status == 200
            # Every other route needs the token: heartbeats, metrics, KV export/import.
            for method, path in (("GET", "/state"), ("GET", "/metrics"), ("GET", "/v1/sessions/s/kv"),
                                 ("PUT", "/v1/sessions/s/kv")):
                async with s.request(method, url + path, data=b"x" if method == "PUT" else None) as r:
                    assert r.status == 401, path
                    assert (await r.json())["error"]["type"] == "authentication_error"
            good = {"Authorization": "Bearer s3cret"}
            for path in ("/state", "/metrics"):
                async with s.get(url + path, headers=good) as r:
                    assert r.status == 200, path


async def test_drain_finishes_running_streams_and_refuses_new_work(tokenizer):
    engine = FakeEngine(tokenizer, token_delay_s=0.02)
    async with serving(engine, server={"drain_retry_after_s": 3}) as (url, rt):
        c = client(url)
        stream = await c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=30, stream=True, extra_body={"ignore_eos": True})
        first = await anext(aiter(stream))
        assert first.choices[0].delta.role == "assistant"
        drain = asyncio.create_task(rt.drain(timeout_s=10))
        await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/health") as r:
                assert r.status == 503 and (await r.json())["status"] == "draining"
            async with s.post(url + "/v1/chat/completions",
                              json={"model": "qwen", "messages": [{"role": "user", "content": "x"}]}) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "3"
                assert (await r.json())["error"]["code"] == "draining"
        assert not drain.done()  # it waits for the running stream
        rest = [x async for x in stream]
        assert rest[-1].choices[0].finish_reason == "length"
        ids = [i for x in rest for i in x.choices[0].model_extra["token_ids"]]
        assert len(ids) == 30
        assert await asyncio.wait_for(drain, 5) is True


async def test_bad_requests_do_not_disturb_a_running_stream(tokenizer):
    engine = FakeEngine(tokenizer, token_delay_s=0.01)
    async with serving(engine) as (url, _):
        c = client(url)

        async def good() -> str:
            s = await c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "x"}],
                                                stream=True)
            return "".join([x.choices[0].delta.content or "" async for x in s])

        async def bad(i: int) -> int:
            bodies = [b"{", b'{"model": "qwen", "messages": 5}', b'{"model": "x", "messages": []}',
                      orjson.dumps({"model": "qwen", "messages": [{"role": "user", "content": "x"}], "n": 4}),
                      orjson.dumps({"model": "qwen", "prompt": [10**9]})]
            async with aiohttp.ClientSession() as s:
                path = "/v1/completions" if i % 5 == 4 else "/v1/chat/completions"
                async with s.post(url + path, data=bodies[i % 5]) as r:
                    return r.status

        results = await asyncio.gather(good(), *[bad(i) for i in range(15)], good())
        assert results[0] == SCRIPT and results[-1] == SCRIPT
        assert all(400 <= s < 500 for s in results[1:-1])


async def test_state_and_metrics(tokenizer):
    engine = FakeEngine(tokenizer)
    async with serving(engine) as (url, _):
        await client(url).chat.completions.create(model="qwen", messages=[{"role": "user", "content": "x"}],
                                                  max_tokens=5)
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/state") as r:
                state = await r.json()
            async with s.get(url + "/metrics") as r:
                metrics = await r.text()
            async with s.get(url + "/health") as r:
                assert r.status == 200 and (await r.json()) == {"status": "ok"}
    assert state["replica_id"] == "r-test" and state["status"] == "ready"
    assert state["model"] == "qwen" and state["adapters"] == ["support"]
    assert state["quantization"] == "nf4" and state["dtype"] == "float32" and state["device"] == "cpu"
    assert state["kv_bytes_used"] == 1024 and state["kv_bytes_free"] == 4096 and state["num_preemptions"] == 2
    assert state["max_model_len"] == 256 and state["pid"] > 0
    # A count, never the ids: a session id is its owner's secret.
    assert state["num_sessions"] == len(engine.kept) and "sessions" not in state
    assert 'unbroken_replica_requests_total{route="/v1/chat/completions",status="200"} 1.0' in metrics
    assert "unbroken_replica_time_to_first_token_seconds_count 1.0" in metrics
    assert "unbroken_replica_inter_token_latency_seconds_count 4.0" in metrics
    assert "unbroken_replica_generated_tokens_total 5.0" in metrics
    assert "unbroken_replica_kv_used_bytes 1024.0" in metrics
    assert "unbroken_replica_preemptions_total 2.0" in metrics
    assert 'unbroken_replica_kv_restores_total{outcome="missing"} 2.0' in metrics
    assert "unbroken_replica_restored_tokens_total 64.0" in metrics


async def test_kv_export_import(tokenizer):
    from kvsync.protocol import decode_snapshot, encode_snapshot

    engine = FakeEngine(tokenizer)
    ident = engine.identity(None)
    snap = KVSnapshot(session_id="other", identity=ident, token_ids=[1, 2, 3],
                      keys=[torch.randn(1, 3, 4) for _ in range(2)], values=[torch.randn(1, 3, 4) for _ in range(2)])
    async with serving(engine) as (url, _):
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/sessions/s9/kv") as r:
                assert r.status == 404
            async with s.put(url + "/v1/sessions/s9/kv", data=encode_snapshot(snap)) as r:
                assert r.status == 200 and (await r.json()) == {"session_id": "s9", "num_tokens": 3}
            async with s.get(url + "/v1/sessions/s9/kv") as r:
                assert r.status == 200
                back = decode_snapshot(await r.read())
            async with s.put(url + "/v1/sessions/s9/kv", data=b"not a snapshot") as r:
                assert r.status == 400
            bad = KVSnapshot(session_id="s9", identity=KVIdentity("qwen", "other-rev", None, "float32", 2, 1, 4),
                             token_ids=[1], keys=[torch.zeros(1, 1, 4)] * 2, values=[torch.zeros(1, 1, 4)] * 2)
            async with s.put(url + "/v1/sessions/s9/kv", data=encode_snapshot(bad)) as r:
                assert r.status == 400
    assert back.session_id == "s9" and back.token_ids == [1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(back.keys, snap.keys))


async def test_registry_announce_and_remove(tokenizer, redis_url):
    import redis.asyncio as aioredis

    from unbroken.procs import free_port

    engine = FakeEngine(tokenizer)
    port = free_port()
    r = aioredis.from_url(redis_url)
    try:
        async with serving(engine, registry={"redis_url": redis_url, "ttl_s": 0.6},
                           server={"port": port}) as (url, rt):
            deadline = time.monotonic() + 5
            value = None
            while value is None and time.monotonic() < deadline:
                value = await r.get("unbroken:replica:r-test")
                await asyncio.sleep(0.05)
            entry = orjson.loads(value)
            assert entry["replica_id"] == "r-test" and entry["model"] == "qwen"
            assert entry["adapters"] == ["support"] and entry["url"] == f"http://127.0.0.1:{port}"
            assert 0 < await r.pttl("unbroken:replica:r-test") <= 600
            await asyncio.sleep(0.9)  # beyond the ttl: still there because it is renewed
            assert await r.exists("unbroken:replica:r-test")
            assert rt.announcer is not None and rt.announcer.num_renewals >= 3
        assert not await r.exists("unbroken:replica:r-test")  # removed on clean shutdown
    finally:
        await r.aclose()


async def test_redis_down_never_breaks_serving(tokenizer):
    from unbroken.procs import free_port

    engine = FakeEngine(tokenizer)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    async with serving(engine, registry={"redis_url": dead, "ttl_s": 0.3}) as (url, rt):
        await asyncio.sleep(0.5)
        r = await client(url).chat.completions.create(model="qwen", messages=[{"role": "user", "content": "x"}],
                                                      max_tokens=3)
        assert r.choices[0].finish_reason == "length"
        assert rt.announcer is not None and rt.announcer.num_failures >= 2
