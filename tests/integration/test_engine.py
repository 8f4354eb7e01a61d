"""The engine on the tiny NF4 model: every greedy token equals the model's own ``generate()``,
under continuous batching, chunked prefill, preemption, cancellation, session reuse, KV
export/import, seeded resumption and LoRA adapters."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from replica.config import ReplicaConfig
from replica.engine import LLMEngine
from replica.loader import load_model
from replica.protocol import FinishReason, GenerationRequest, SamplingParams
from unbroken.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError

PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog and then",
    "a",
    "Replicas crash and hang and come back again later. " * 4,
    "def add(a, b):",
    "When the gateway sees a stalled stream it",
]


def _config(model_dir: Path, **engine: object) -> ReplicaConfig:
    return ReplicaConfig.model_validate({"model": {"path": str(model_dir)}, "engine": engine})


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load_model(_config(tiny_model_dir).model, progress=lambda _: None)


def _engine(loaded, tiny_model_dir: Path, **engine: object) -> LLMEngine:
    return LLMEngine(_config(tiny_model_dir, **engine), loaded)


def _ids(loaded, text: str) -> list[int]:
    return loaded.tokenizer(text)["input_ids"]


def _reference(loaded, prompt: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """What the model's own generate() gives, stopping at the same EOS set as the engine (or, as
    ``ignore_eos`` does, at no token at all)."""
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
            **({"eos_token_id": -1, "pad_token_id": 0} if ignore_eos else {}),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt):].tolist()


def _run(engine: LLMEngine, requests: list[GenerationRequest], arrive_every_steps: int = 1,
         max_steps: int = 5000):
    """Feed requests one per ``arrive_every_steps`` steps (so they join a running batch) and run
    to completion. Returns tokens per request, finish reasons, outputs and the step log."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    reasons: dict[str, FinishReason] = {}
    outputs = []
    pending = list(requests)
    steps = 0
    while pending or engine.has_unfinished():
        if arrive_every_steps == 0:
            while pending:
                engine.add_request(pending.pop(0))
        elif pending and steps % arrive_every_steps == 0:
            engine.add_request(pending.pop(0))
        for out in engine.step():
            outputs.append((steps, out))
            if out.token_id is not None:
                tokens[out.request_id].append(out.token_id)
            if out.finish_reason is not None:
                reasons[out.request_id] = out.finish_reason
        steps += 1
        assert steps < max_steps, "engine did not finish"
    return tokens, reasons, outputs


def _greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


@pytest.mark.parametrize("arrive_every_steps", [3, 0], ids=["staggered", "all-at-once"])
def test_greedy_equals_generate_under_continuous_batching(loaded, tiny_model_dir, arrive_every_steps):
    engine = _engine(loaded, tiny_model_dir)
    lengths = [24, 40, 8, 32, 17, 29]
    requests = [
        GenerationRequest(f"r{i}", _ids(loaded, p), _greedy(n)) for i, (p, n) in enumerate(zip(PROMPTS, lengths))
    ]
    tokens, reasons, outputs = _run(engine, requests, arrive_every_steps=arrive_every_steps)
    for req, n in zip(requests, lengths):
        assert tokens[req.request_id] == _reference(loaded, req.prompt_token_ids, n), req.request_id
    # Requests joined while others were decoding and left at different steps.
    first_step = {o.request_id: s for s, o in reversed(outputs)}
    last_step = {o.request_id: s for s, o in outputs}
    if arrive_every_steps:
        assert len(set(first_step.values())) > 1
    assert len(set(last_step.values())) > 1
    assert engine.scheduler.num_used_tokens == 0 and not engine.runner.rows


def test_long_decodes_grow_the_in_place_cache_and_stay_exact(loaded, tiny_model_dir):
    """Rows that decode together for longer than the cache's spare columns: the new columns are
    written in place, the buffer moves when full, and a row that leaves midway changes nothing."""
    from replica.runner import SPARE_COLUMNS

    engine = _engine(loaded, tiny_model_dir)
    lengths = [2 * SPARE_COLUMNS + 7, SPARE_COLUMNS + 3, 3 * SPARE_COLUMNS]
    requests = [GenerationRequest(f"l{i}", _ids(loaded, PROMPTS[i]), _greedy(n, ignore_eos=True))
                for i, n in enumerate(lengths)]
    tokens, _, _ = _run(engine, requests, arrive_every_steps=0)
    for req, n in zip(requests, lengths):
        assert len(tokens[req.request_id]) == n
        assert tokens[req.request_id] == _reference(loaded, req.prompt_token_ids, n, ignore_eos=True), \
            req.request_id


def test_rows_that_leave_do_not_move_the_cache(loaded, tiny_model_dir, monkeypatch):
    """A leave selects the remaining rows of the whole buffers (spare columns included): the batch's
    KV is allocated once at the first decode and never again while the spare columns last."""
    import replica.runner as runner_module

    allocations = []
    real = runner_module._new_buffers
    monkeypatch.setattr(runner_module, "_new_buffers", lambda *a: allocations.append(a[1:]) or real(*a))
    engine = _engine(loaded, tiny_model_dir)
    lengths = [10, 20, runner_module.SPARE_COLUMNS - 2]
    requests = [GenerationRequest(f"k{i}", _ids(loaded, PROMPTS[i]), _greedy(n, ignore_eos=True))
                for i, n in enumerate(lengths)]
    tokens, _, _ = _run(engine, requests, arrive_every_steps=0)
    assert len(allocations) == 2, allocations  # keys and values, once
    for req, n in zip(requests, lengths):
        assert tokens[req.request_id] == _reference(loaded, req.prompt_token_ids, n, ignore_eos=True)


def test_chunked_prefill_does_not_stall_running_decodes(loaded, tiny_model_dir):
    engine = _engine(loaded, tiny_model_dir, max_prefill_tokens_per_step=16)
    short = GenerationRequest("short", _ids(loaded, PROMPTS[0]), _greedy(40, ignore_eos=True))
    long_prompt = _ids(loaded, PROMPTS[3] * 2)
    assert len(long_prompt) > 64
    long = GenerationRequest("long", long_prompt, _greedy(10))
    tokens, _, outputs = _run(engine, [short, long], arrive_every_steps=2)
    assert tokens["long"] == _reference(loaded, long_prompt, 10)
    assert tokens["short"] == _reference(loaded, short.prompt_token_ids, 40, ignore_eos=True)
    # While the long prompt was being prefilled in 16-token chunks, "short" got a token every step.
    long_first = next(s for s, o in outputs if o.request_id == "long")
    short_steps = {s for s, o in outputs if o.request_id == "short"}
    assert long_first >= 2 + len(long_prompt) // 16 - 1
    assert all(s in short_steps for s in range(2, long_first))


def test_preemption_recomputes_and_stays_exact(loaded, tiny_model_dir):
    per_token = loaded.kv_bytes_per_token
    engine = _engine(loaded, tiny_model_dir, kv_cache_bytes=per_token * 120)
    requests = [GenerationRequest(f"p{i}", _ids(loaded, PROMPTS[i]), _greedy(30, ignore_eos=True))
                for i in (0, 1, 4, 5)]
    tokens, reasons, _ = _run(engine, requests, arrive_every_steps=1)
    assert engine.scheduler.num_preemptions > 0
    for req in requests:
        assert tokens[req.request_id] == _reference(loaded, req.prompt_token_ids, 30, ignore_eos=True)
        assert reasons[req.request_id] is FinishReason.LENGTH


def test_cancellation_frees_kv_and_leaves_others_alone(loaded, tiny_model_dir):
    engine = _engine(loaded, tiny_model_dir)
    a = GenerationRequest("a", _ids(loaded, PROMPTS[1]), _greedy(30, ignore_eos=True))
    b = GenerationRequest("b", _ids(loaded, PROMPTS[5]), _greedy(30, ignore_eos=True))
    engine.add_request(a)
    engine.add_request(b)
    got: dict[str, list[int]] = {"a": [], "b": []}
    for _ in range(5):
        for out in engine.step():
            got[out.request_id].append(out.token_id)
    cancelled = engine.abort("b")
    assert cancelled is not None and cancelled.finish_reason is FinishReason.CANCELLED
    assert engine.abort("b") is None
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].append(out.token_id)
    assert got["a"] == _reference(loaded, a.prompt_token_ids, 30, ignore_eos=True)
    assert len(got["b"]) == 5
    assert engine.scheduler.num_used_tokens == 0 and not engine.runner.rows


def test_session_reuse_skips_the_shared_prefix(loaded, tiny_model_dir):
    engine = _engine(loaded, tiny_model_dir)
    turn1 = _ids(loaded, PROMPTS[3])
    tokens, _, _ = _run(engine, [GenerationRequest("t1", turn1, _greedy(12, ignore_eos=True), session_id="s")])
    assert "s" in engine.scheduler.sessions
    turn2 = turn1 + tokens["t1"] + _ids(loaded, " and the next question")
    tokens2, _, outputs = _run(engine, [GenerationRequest("t2", turn2, _greedy(15), session_id="s")])
    assert tokens2["t2"] == _reference(loaded, turn2, 15)
    first = outputs[0][1]
    # Everything turn 1 computed was reused: its prompt and all but its last token.
    assert first.num_cached_prompt_tokens == len(turn1) + 12 - 1
    assert first.cache_source == "session"


def test_export_import_round_trip_continues_exactly(loaded, tiny_model_dir):
    a = _engine(loaded, tiny_model_dir)
    turn1 = _ids(loaded, PROMPTS[1])
    tokens, _, _ = _run(a, [GenerationRequest("t1", turn1, _greedy(10, ignore_eos=True), session_id="s")])
    snapshot = a.export_session("s")
    assert snapshot is not None and len(snapshot.token_ids) == len(turn1) + 9
    assert snapshot.keys[0].shape == (loaded.num_kv_heads, len(snapshot.token_ids), loaded.head_dim)

    b = _engine(loaded, tiny_model_dir)
    assert b.import_session(snapshot) == len(snapshot.token_ids)
    turn2 = turn1 + tokens["t1"] + _ids(loaded, " tell me more")
    tokens2, _, outputs = _run(b, [GenerationRequest("t2", turn2, _greedy(20), session_id="s")])
    assert tokens2["t2"] == _reference(loaded, turn2, 20)
    assert outputs[0][1].num_cached_prompt_tokens == len(snapshot.token_ids)
    assert outputs[0][1].cache_source == "restored"

    wrong = dataclasses.replace(snapshot, identity=dataclasses.replace(snapshot.identity, revision="other"))
    with pytest.raises(InvalidRequestError):
        b.import_session(wrong)
    bad_shape = dataclasses.replace(snapshot, keys=[k[:, :-1] for k in snapshot.keys])
    with pytest.raises(InvalidRequestError):
        b.import_session(bad_shape)
    poisoned = dataclasses.replace(snapshot, session_id="p", keys=[k.clone() for k in snapshot.keys])
    poisoned.keys[1][0, 2, 0] = float("nan")
    with pytest.raises(InvalidRequestError, match="not finite"):
        b.import_session(poisoned)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        b.import_session(dataclasses.replace(snapshot, session_id="p", token_ids=[10**7] + snapshot.token_ids[1:]))
    assert "p" not in b.runner.sessions


def test_session_bookkeeping_keyed_by_clients_is_bounded(loaded, tiny_model_dir):
    engine = _engine(loaded, tiny_model_dir, max_kept_sessions=2, max_num_seqs=2)
    requests = [GenerationRequest(f"r{i}", _ids(loaded, "a"), _greedy(1), session_id=f"s{i}") for i in range(12)]
    _run(engine, requests, arrive_every_steps=0)
    assert len(engine.scheduler.sessions) <= 2
    assert len(engine.published_tokens) <= 2 + 2  # kept sessions + running rows, never one per client id


def test_seeded_sampling_resumes_exactly(loaded, tiny_model_dir):
    engine = _engine(loaded, tiny_model_dir)
    prompt = _ids(loaded, PROMPTS[4])
    sp = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    full, _, _ = _run(engine, [GenerationRequest("full", prompt, sp)])
    again, _, _ = _run(engine, [GenerationRequest("again", prompt, sp),
                                GenerationRequest("other", _ids(loaded, PROMPTS[0]), sp)])
    assert again["again"] == full["full"]
    k = 9
    resumed, _, _ = _run(engine, [GenerationRequest("resumed", prompt, sp, resume_token_ids=full["full"][:k])])
    assert resumed["resumed"] == full["full"][k:]


def test_greedy_resume_matches_uninterrupted(loaded, tiny_model_dir):
    engine = _engine(loaded, tiny_model_dir)
    prompt = _ids(loaded, PROMPTS[5])
    ref = _reference(loaded, prompt, 30)
    resumed, _, _ = _run(engine, [GenerationRequest("r", prompt, _greedy(30), resume_token_ids=ref[:11])])
    assert resumed["r"] == ref[11:]


def test_cpu_nf4_layers_keep_the_float32_kernel_unless_asked(loaded, tiny_model_dir):
    """bitsandbytes' fused bfloat16 kernel (CPUs with AVX512-BF16) makes greedy picks depend on the
    batch; the replica keeps float32 unless configured, and marks the other kernel's KV identity."""
    import bitsandbytes as bnb

    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert not loaded.revision.endswith("-bf16kernel")
    if not bnb.functional.has_avx512bf16():
        return  # this CPU has no fused kernel to opt into
    fast = load_model(_config(tiny_model_dir).model.model_copy(update={"cpu_bf16_kernel": True}),
                      progress=lambda _: None)
    assert fast.revision == loaded.revision + "-bf16kernel"
    assert all(m.support_avx512bf16_for_cpu for m in fast.model.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_min_tokens_max_tokens_and_validation(loaded, tiny_model_dir):
    engine = _engine(loaded, tiny_model_dir)
    eos = sorted(engine.eos_token_ids)
    prompt = _ids(loaded, PROMPTS[2])
    toks, reasons, _ = _run(engine, [GenerationRequest("m", prompt, _greedy(20, min_tokens=20))])
    assert len(toks["m"]) == 20 and not set(toks["m"][:-1]) & set(eos)
    assert reasons["m"] is FinishReason.LENGTH or toks["m"][-1] in eos
    with pytest.raises(ContextLengthError):
        engine.add_request(GenerationRequest("long", [5] * engine.max_model_len, _greedy(4)))
    with pytest.raises(ModelNotFoundError):
        engine.add_request(GenerationRequest("x", prompt, _greedy(4), adapter="nope"))
    with pytest.raises(InvalidRequestError):
        engine.add_request(GenerationRequest("e", [], _greedy(4)))


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with non-zero weights, made at test time."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(7)
    peft_model = get_peft_model(base, LoraConfig(
        r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("adapter-support")
    peft_model.save_pretrained(out)
    return out


def test_lora_adapters_in_one_batch_equal_peft_generate(tiny_model_dir, adapter_dir):
    cfg = ReplicaConfig.model_validate({"model": {"path": str(tiny_model_dir),
                                                  "adapters": {"support": str(adapter_dir)}}})
    engine = LLMEngine(cfg)
    engine.load(progress=lambda _: None)
    peft_model = engine.loaded.model
    prompt = engine.loaded.tokenizer(PROMPTS[1])["input_ids"]
    reqs = [GenerationRequest("base", prompt, _greedy(20, ignore_eos=True)),
            GenerationRequest("lora", prompt, _greedy(20, ignore_eos=True), adapter="support")]
    tokens, _, _ = _run(engine, reqs, arrive_every_steps=1)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        peft_model.set_adapter("support")
        ref_lora = peft_model.generate(input_ids=ids, max_new_tokens=20, do_sample=False,
                                       eos_token_id=None)[0, len(prompt):].tolist()
        with peft_model.disable_adapter():
            ref_base = peft_model.generate(input_ids=ids, max_new_tokens=20, do_sample=False,
                                           eos_token_id=None)[0, len(prompt):].tolist()
    assert tokens["lora"] == ref_lora
    assert tokens["base"] == ref_base
    assert tokens["lora"] != tokens["base"]


def test_async_engine_streams_and_aborts_on_early_exit(loaded, tiny_model_dir):
    import asyncio

    from replica.engine import AsyncEngine

    async def main() -> None:
        engine = AsyncEngine(_config(tiny_model_dir), loaded=loaded)
        await engine.start()
        try:
            prompt = _ids(loaded, PROMPTS[1])

            async def full() -> list[int]:
                req = GenerationRequest("full", prompt, _greedy(25, ignore_eos=True))
                return [o.token_id async for o in engine.generate(req) if o.token_id is not None]

            async def early() -> int:
                req = GenerationRequest("early", _ids(loaded, PROMPTS[4]), _greedy(200, ignore_eos=True))
                n = 0
                async for _ in engine.generate(req):
                    n += 1
                    if n == 3:
                        break
                return n

            tokens, n = await asyncio.gather(full(), early())
            assert tokens == _reference(loaded, prompt, 25, ignore_eos=True) and n == 3
            for _ in range(100):  # the abort reaches the engine thread
                if engine.stats().num_running == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.stats().num_running == 0 and engine.stats().kv_bytes_used == 0
        finally:
            await engine.stop()

    asyncio.run(main())


class _FakeKVSync:
    """Stands in for kvsync's client (the subject here is the engine's side of the contract)."""

    def __init__(self) -> None:
        self.published = []
        self.store = {}
        self.fetches = 0
        self.too_large_sessions: set[str] = set()

    def too_large(self, session_id) -> bool:
        return session_id in self.too_large_sessions

    def publish(self, snapshot) -> bool:
        self.published.append(snapshot)
        return True

    async def fetch(self, session_id, identity, timeout_s, max_tokens=0):
        from types import SimpleNamespace

        self.fetches += 1
        snap = self.store.get(session_id)
        if snap is None:
            return SimpleNamespace(snapshot=None, outcome="missing", transcript=None)
        if snap.identity != identity:
            return SimpleNamespace(snapshot=None, outcome="mismatch", transcript=None)
        return SimpleNamespace(snapshot=snap, outcome="restored", transcript=snap.transcript)


def test_engine_exports_nothing_for_a_session_the_sidecar_cannot_keep(loaded, tiny_model_dir):
    cfg = ReplicaConfig.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "kvsync": {"enabled": True, "snapshot_every_tokens": 8, "block_tokens": 16},
    })
    fake = _FakeKVSync()
    fake.too_large_sessions.add("huge")
    engine = LLMEngine(cfg, loaded, kvsync=fake)
    reqs = [GenerationRequest(f"t-{sid}", _ids(loaded, PROMPTS[3]), _greedy(20, ignore_eos=True), session_id=sid)
            for sid in ("huge", "fine")]
    _run(engine, reqs)
    for sid in ("huge", "fine"):
        engine.finish_turn(sid, [{"role": "user", "content": "q"}])
    assert {s.session_id for s in fake.published} == {"fine"}


def test_engine_publishes_incremental_snapshots_every_n_tokens_and_after_turns(loaded, tiny_model_dir):
    cfg = ReplicaConfig.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "kvsync": {"enabled": True, "snapshot_every_tokens": 8, "block_tokens": 16},
    })
    fake = _FakeKVSync()
    engine = LLMEngine(cfg, loaded, kvsync=fake)
    turn1 = _ids(loaded, PROMPTS[3])
    tokens, _, _ = _run(engine, [GenerationRequest("t1", turn1, _greedy(20, ignore_eos=True), session_id="s")])
    mid = list(fake.published)
    assert len(mid) == 2  # after 8 and 16 generated tokens
    assert mid[0].start == 0  # nothing was replicated before: a full snapshot
    assert mid[1].start == len(mid[0].token_ids) // 16 * 16  # then only whole new blocks onwards
    engine.finish_turn("s", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    after_turn = fake.published[-1]
    assert after_turn.transcript is not None and after_turn.start % 16 == 0 and after_turn.start > 0
    n = len(after_turn.token_ids)
    assert n == len(turn1) + 19
    assert after_turn.keys[0].shape[1] == n - after_turn.start
    # The incremental tail equals the same rows of a full export.
    full = engine.export_session("s")
    assert torch.equal(full.keys[2][:, after_turn.start:], after_turn.keys[2])


def test_async_engine_restores_a_session_through_kvsync(loaded, tiny_model_dir):
    import asyncio

    from replica.engine import AsyncEngine

    source = _engine(loaded, tiny_model_dir)
    turn1 = _ids(loaded, PROMPTS[1])
    tokens, _, _ = _run(source, [GenerationRequest("t1", turn1, _greedy(10, ignore_eos=True), session_id="s")])
    source.set_transcript("s", [{"role": "user", "content": "hi"}])
    snapshot = source.export_session("s")
    fake = _FakeKVSync()
    fake.store["s"] = snapshot
    turn2 = turn1 + tokens["t1"] + _ids(loaded, " and then")
    cfg = ReplicaConfig.model_validate({"model": {"path": str(tiny_model_dir)}, "kvsync": {"enabled": True}})

    async def main():
        engine = AsyncEngine(cfg, fake, loaded=loaded)
        await engine.start()
        try:
            outs = [o async for o in engine.generate(GenerationRequest("t2", turn2, _greedy(12), session_id="s"))]
            transcript = await engine.session_transcript("s")
            missing = [o async for o in engine.generate(
                GenerationRequest("t3", turn1, _greedy(3), session_id="unknown"))]
            return outs, transcript, missing, engine.stats()
        finally:
            await engine.stop()

    outs, transcript, missing, stats = asyncio.run(main())
    assert [o.token_id for o in outs if o.token_id is not None] == _reference(loaded, turn2, 12)
    assert outs[0].num_cached_prompt_tokens == len(snapshot.token_ids) and outs[0].cache_source == "restored"
    assert transcript == [{"role": "user", "content": "hi"}]
    assert missing[0].num_cached_prompt_tokens == 0
    assert stats.restore_outcomes == {"restored": 1, "missing": 1}
    assert stats.num_restored_tokens == len(snapshot.token_ids)
