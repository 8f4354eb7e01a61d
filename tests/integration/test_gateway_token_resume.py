"""Token-exact resume through vLLM's and SGLang's token-id APIs (the token route): the gateway renders
the chat template from the model's tokenizer files, sends prompt ids to emulated engines (real HTTP,
free ports) that answer greedily from the ids, and a stream cut mid-answer continues on another
token-capable engine with prompt + generated ids: the answer equals an uninterrupted run, id for id.
Under ``-m slow``: a stream cut on vLLM continues on one of the project's replicas (``resume_token_ids``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from gateway.config import GatewayConfig
from gateway.testing import RunningGateway, parse_sse, stream_tokens
from gateway.tokenizer import ChatTokenizer
from loadtest.emulators import EmulatorKnobs, EngineEmulator, expected_text, make_emulator, prompt_base
from loadtest.emulators.flavors import SGLangFlavor
from loadtest.emulators.tokens import HashGreedyModel

pytestmark = pytest.mark.asyncio

N = 24
CHAT = {"model": "qwen", "messages": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "tell me a story about <|im_start|> tokens"}],
        "max_tokens": N, "stream": True, "temperature": 0}
COMPLETION = {"model": "qwen", "prompt": "once upon a time", "max_tokens": N, "stream": True, "temperature": 0,
              "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def model(tiny_tokenizer_dir: Path) -> HashGreedyModel:
    return HashGreedyModel(tiny_tokenizer_dir)


def want(tiny_tokenizer_dir: Path, model: HashGreedyModel, body: dict[str, Any], n: int = N) -> tuple[list[int], str]:
    """The uninterrupted greedy answer: ids and text."""
    tok = ChatTokenizer.load(tiny_tokenizer_dir)
    if "messages" in body:
        prompt = tok.chat_prompt_ids(body["messages"])
    else:
        prompt = tok.tokenizer.encode(body["prompt"], add_special_tokens=True).ids
    ids = model.generate(prompt, n)
    return ids, tok.decode(ids)


def emulator(kind: str, model: HashGreedyModel, name: str, serve: str = "qwen", **knobs: Any) -> EngineEmulator:
    e = make_emulator(kind, EmulatorKnobs(**knobs), name=name, model=serve, token_model=model)
    if kind == "sglang" and name.endswith("1"):
        e.flavor = SGLangFlavor(stream_output=True)  # one of them streams only the new output_ids
    return e


@pytest_asyncio.fixture
async def pool(request: pytest.FixtureRequest, model: HashGreedyModel) -> AsyncIterator[list[EngineEmulator]]:
    emus = [await emulator(kind, model, f"{kind}{i}").start() for i, kind in enumerate(request.param)]
    try:
        yield emus
    finally:
        for e in emus:
            await e.stop()


async def start_gateway(emus: list[EngineEmulator], tiny_tokenizer_dir: Path | None, **replicas: Any) -> RunningGateway:
    cfg = GatewayConfig.model_validate({
        "server": {"port": 0},
        "replicas": {"urls": [e.url for e in emus], "stall_timeout_s": 2.0, "first_byte_timeout_s": 2.0,
                     "tokenizers": {"qwen": str(tiny_tokenizer_dir)} if tiny_tokenizer_dir else {}, **replicas},
        "routing": {"session_affinity": False, "policy": "least_load"},
        "retry": {"backoff_initial_ms": 1, "backoff_max_ms": 5, "hedge_critical": False},
        "health": {"heartbeat_interval_ms": 50, "heartbeat_timeout_ms": 500},
    })
    gw = await RunningGateway(cfg).start()
    await gw.wait_healthy(len(emus), timeout_s=10)
    return gw


async def post(url: str, body: dict[str, Any]) -> list[Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as r:
            assert r.status == 200, await r.text()
            return parse_sse(await r.text())


def route_of(body: dict[str, Any]) -> str:
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


def assert_exact(events: list[Any], want_ids: list[int], want_text: str) -> list[dict[str, Any]]:
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [e for e in events if isinstance(e, dict)]
    assert not any("error" in c for c in chunks), chunks[-1]
    ids, text = stream_tokens(events)
    assert ids == want_ids
    assert text == want_text
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert {c["model"] for c in chunks} == {"qwen"}
    finals = [ch for c in chunks for ch in c.get("choices") or [] if ch.get("finish_reason")]
    assert [ch["finish_reason"] for ch in finals] == ["length"]
    return chunks


def num_token_resumes(gw: RunningGateway, kind: str) -> float:
    return gw.gateway.metrics.resumes.labels("token", kind)._value.get()


@pytest.mark.parametrize("pool", [["vllm", "vllm"], ["sglang", "sglang"]], indirect=True, ids=["vllm", "sglang"])
@pytest.mark.parametrize("body", [CHAT, COMPLETION], ids=["chat", "completions"])
async def test_cut_stream_resumes_token_exact_on_another_engine(pool: list[EngineEmulator], body: dict[str, Any],
                                                                tiny_tokenizer_dir: Path, model: HashGreedyModel) -> None:
    kind = pool[0].flavor.kind
    want_ids, want_text = want(tiny_tokenizer_dir, model, body)
    gw = await start_gateway(pool, tiny_tokenizer_dir)
    try:
        # uninterrupted first, then cut after 7 tokens on whichever engine takes it
        assert_exact(await post(gw.url + route_of(body), body), want_ids, want_text)
        for e in pool:
            e.knobs.cut_after_tokens = 7
        chunks = assert_exact(await post(gw.url + route_of(body), body), want_ids, want_text)
        assert chunks[-1]["unbroken"]["failovers"] >= 1 and "resume" not in chunks[-1]["unbroken"]
        assert num_token_resumes(gw, kind) >= 1
        # the resumed request carried the prompt and the 7 ids the client had, by id
        prompts = [p for e in pool for p in e.token_prompts]
        first = min(prompts, key=len)
        assert first + want_ids[:7] in prompts
        if "stream_options" in body:
            usage = chunks[-1]["usage"]
            assert usage["completion_tokens"] == N and usage["prompt_tokens"] == len(first)
        else:
            assert sum(1 for c in chunks for ch in c["choices"] if "role" in (ch.get("delta") or {})) == 1
        assert sum(e.num_bad_prefixes for e in pool) == 0 and all(e.num_token_requests for e in pool)
    finally:
        await gw.stop()


@pytest.mark.parametrize("pool", [["vllm", "sglang", "tgi"]], indirect=True)
async def test_mixed_pool_resumes_on_a_token_capable_engine(pool: list[EngineEmulator], tiny_tokenizer_dir: Path,
                                                            model: HashGreedyModel) -> None:
    vllm, sglang, tgi = pool
    sglang.knobs.num_running_override = 10  # vLLM first, then SGLang,
    tgi.knobs.num_running_override = 50  # and TGI only when nothing else can
    want_ids, want_text = want(tiny_tokenizer_dir, model, COMPLETION)
    gw = await start_gateway(pool, tiny_tokenizer_dir)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url + "/admin/replicas") as r:
                admin = {x["kind"]: x["resume"] for x in (await r.json())["replicas"]}
        assert admin["vllm"]["completions"] == "token" and admin["vllm"]["token_models"] == ["qwen"]
        assert admin["sglang"]["chat"] == "token" and admin["tgi"]["completions"] == "text"
        info = [line for line in gw.gateway.metrics.render().decode().splitlines()
                if line.startswith("unbroken_gateway_replica_backend_info") and 'kind="vllm"' in line]
        assert len(info) == 1 and 'resume_chat="token"' in info[0] and 'resume_completions="token"' in info[0]
        vllm.knobs.cut_after_tokens = 5
        assert_exact(await post(gw.url + "/v1/completions", COMPLETION), want_ids, want_text)
        assert tgi.num_requests == 0  # a text continuation was possible there, and an exact one was preferred
        assert num_token_resumes(gw, "sglang") == 1
    finally:
        await gw.stop()


@pytest.mark.parametrize("pool", [["vllm", "vllm"]], indirect=True)
@pytest.mark.parametrize("case", ["no_tokenizer", "turned_down"])
async def test_text_mode_without_a_tokenizer_or_when_turned_down(pool: list[EngineEmulator], case: str,
                                                                 tiny_tokenizer_dir: Path) -> None:
    gw = await start_gateway(pool, None if case == "no_tokenizer" else tiny_tokenizer_dir,
                             **({"resume": {"vllm": "text"}} if case == "turned_down" else {}))
    try:
        for e in pool:
            e.knobs.cut_after_tokens = 7
        events = await post(gw.url + "/v1/chat/completions", CHAT)
        chunks = [e for e in events if isinstance(e, dict)]
        assert events[-1] == "[DONE]"
        assert stream_tokens(events)[1] == expected_text(prompt_base(CHAT, True)[0], N)
        assert chunks[-1]["unbroken"]["resume"] == "text"
        assert sum(e.num_token_requests for e in pool) == 0
    finally:
        await gw.stop()


@pytest.mark.parametrize("pool", [["vllm", "sglang"]], indirect=True)
async def test_stop_string_is_cut_by_the_gateway(pool: list[EngineEmulator], tiny_tokenizer_dir: Path,
                                                 model: HashGreedyModel) -> None:
    want_ids, want_text = want(tiny_tokenizer_dir, model, CHAT)
    stop = want_text[len(want_text) // 2:len(want_text) // 2 + 4]
    gw = await start_gateway(pool, tiny_tokenizer_dir)
    try:
        for e in pool:
            e.knobs.cut_after_tokens = 3
        events = await post(gw.url + "/v1/chat/completions", {**CHAT, "stop": [stop]})
        assert events[-1] == "[DONE]"
        assert stream_tokens(events)[1] == want_text[:want_text.find(stop)]
        finals = [ch["finish_reason"] for e in events if isinstance(e, dict) for ch in e["choices"]
                  if ch.get("finish_reason")]
        assert finals == ["stop"]
    finally:
        await gw.stop()


@pytest.mark.parametrize("pool", [["vllm", "sglang"]], indirect=True)
async def test_a_clients_reconnect_continues_through_the_token_route(pool: list[EngineEmulator],
                                                                     tiny_tokenizer_dir: Path,
                                                                     model: HashGreedyModel) -> None:
    want_ids, want_text = want(tiny_tokenizer_dir, model, CHAT)
    for e in pool:
        e.knobs.token_interval_ms = 5
    gw = await start_gateway(pool, tiny_tokenizer_dir)
    try:
        async with aiohttp.ClientSession() as s:
            headers = {"X-Request-ID": "tok-1"}
            resp = await s.post(gw.url + "/v1/chat/completions", json=CHAT, headers=headers)
            assert resp.status == 200
            buf = ""
            while len(stream_tokens(parse_sse(buf[:buf.rfind("\n\n") + 2]))[0]) < 9:
                chunk = await resp.content.readany()
                assert chunk, "the stream ended early"
                buf += chunk.decode()
            first = buf[:buf.rfind("\n\n") + 2]
            resp.close()
            last = [line[3:].strip() for line in first.split("\n") if line.startswith("id:")][-1]
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT,
                              headers={**headers, "Last-Event-ID": last}) as r2:
                assert r2.status == 200, await r2.text()
                rest = await r2.text()
        events = parse_sse(first) + parse_sse(rest)
        assert_exact(events, want_ids, want_text)
        assert rest.split("\n")[0] == f"id: tok-1:{int(last.split(':')[1]) + 1}"
    finally:
        await gw.stop()


async def test_the_real_tiny_model_cut_on_vllm_continued_on_sglang_equals_its_generate(tiny_model_dir: Path) -> None:
    """Engines that run the tiny Qwen checkpoint itself (float32, greedy): a chat cut on vLLM and
    continued on SGLang is the text of transformers' own ``generate()`` on ``apply_chat_template``."""
    from transformers import AutoTokenizer

    from loadtest.emulators.tokens import TinyCheckpointModel

    tiny = TinyCheckpointModel(tiny_model_dir)
    ref = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    body = {**CHAT, "messages": [{"role": "user", "content": "tell me a story"}]}  # no control token spelled
    prompt = ref.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    want_ids = tiny.generate(prompt, N)
    emus = [await make_emulator("vllm", EmulatorKnobs(cut_after_tokens=6), name="vllm0", token_model=tiny).start(),
            await make_emulator("sglang", EmulatorKnobs(num_running_override=5), name="sglang1",
                                token_model=tiny).start()]
    gw = await start_gateway(emus, tiny_model_dir)
    try:
        events = await post(gw.url + "/v1/chat/completions", body)
        ids, text = stream_tokens(events)
        assert events[-1] == "[DONE]" and emus[1].token_prompts == [prompt + want_ids[:6]]
        assert ids == want_ids and text == ref.decode(want_ids, skip_special_tokens=True)
    finally:
        await gw.stop()
        for e in emus:
            await e.stop()


@pytest.mark.slow  # a replica process: ~10 s more than the rest of this file together
async def test_a_vllm_stream_resumes_on_the_projects_replica(tiny_replica_url: str, tiny_model_dir: Path,
                                                             reference: Any) -> None:
    """A chat on the token route cut on vLLM continues on a project replica with ``resume_token_ids``:
    the answer is the model's own greedy one."""
    from loadtest.emulators.tokens import CallableModel

    tok, generate = reference
    body = {**CHAT, "messages": [{"role": "user", "content": "tell me a story"}]}
    prompt = ChatTokenizer.load(tiny_model_dir).chat_prompt_ids(body["messages"])
    want_ids = generate(prompt, N)
    vllm = await make_emulator("vllm", EmulatorKnobs(cut_after_tokens=6), name="vllm0",
                               token_model=CallableModel(generate, lambda ids: tok.decode(ids))).start()
    gw = await start_gateway([], tiny_model_dir, urls=[vllm.url, tiny_replica_url], kinds={vllm.url: "vllm"})
    try:
        await gw.wait_healthy(2, timeout_s=10)
        for _ in range(2):  # the first request may land on the replica: the second then lands on vLLM
            events = await post(gw.url + "/v1/chat/completions", body)
            ids, text = stream_tokens(events)
            assert events[-1] == "[DONE]"
            assert ids == want_ids and text == tok.decode(want_ids, skip_special_tokens=True)
            if vllm.num_token_requests:
                break
        assert vllm.num_token_requests == 1 and num_token_resumes(gw, "unbroken") == 1
    finally:
        await gw.stop()
        await vllm.stop()


@pytest.mark.parametrize("pool", [["vllm"]], indirect=True)
async def test_a_template_that_refuses_the_messages_is_a_400(pool: list[EngineEmulator], tiny_tokenizer_dir: Path,
                                                             tmp_path: Path) -> None:
    import json
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_tokenizer_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}" \
        + (config.get("chat_template") or (tiny_tokenizer_dir / "chat_template.jinja").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    gw = await start_gateway(pool, tmp_path)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 400
                err = (await r.json())["error"]
        assert "one message only" in err["message"] and err["param"] == "messages"
        assert pool[0].num_requests == 0
    finally:
        await gw.stop()
