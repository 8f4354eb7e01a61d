"""Benchmark: the replica's engine against three baselines, in one run, on the same requests.

32 requests of mixed prompt and output lengths arrive over the first half second. Measured:

- engine: :class:`replica.engine.LLMEngine` with continuous batching (requests join as they
  arrive, leave as they finish);
- limit: a plain batched forward loop over the same requests and token counts, every request
  present from the start (one left-padded batched prefill, then batched decode steps that drop
  finished rows). Nothing can do the same work faster on this model: it is the ceiling;
- sequential ``generate()``, one request at a time;
- transformers' own continuous batching (the manager behind ``model.generate_batch``), with
  the same arrivals.

The limit and the engine run ``--rounds`` times each, alternating, and the table shows each one's
median: on a shared machine a single run of either swings by a quarter.

Usage: ``python -m loadtest.bench_replica [--requests 32] [--rounds 5] [--model DIR] [--skip-sequential]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from replica.config import ReplicaConfig
from replica.engine import LLMEngine
from replica.loader import LoadedModel, load_model
from replica.protocol import GenerationRequest, SamplingParams
from replica.runner import cache_kwarg


@dataclass
class Work:
    prompt: list[int]
    num_output_tokens: int
    arrival_s: float


def make_workload(num_requests: int, vocab: int, seed: int = 0, arrival_window_s: float = 0.5) -> list[Work]:
    rng = random.Random(seed)
    work = []
    for i in range(num_requests):
        prompt_len = rng.choice([16, 32, 64, 128, 256])
        out_len = rng.choice([32, 64, 128, 256])
        prompt = [rng.randrange(10, vocab - 10) for _ in range(prompt_len)]
        work.append(Work(prompt, out_len, arrival_window_s * i / num_requests))
    return work


def run_engine(loaded: LoadedModel, cfg: ReplicaConfig, work: list[Work]) -> tuple[float, int]:
    engine = LLMEngine(cfg, loaded)
    pending = sorted(work, key=lambda w: w.arrival_s)
    total = 0
    t0 = time.perf_counter()
    i = 0
    while i < len(pending) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while i < len(pending) and pending[i].arrival_s <= now:
            w = pending[i]
            engine.add_request(GenerationRequest(
                f"r{i}", w.prompt,
                SamplingParams(max_tokens=w.num_output_tokens, temperature=0.0, ignore_eos=True)))
            i += 1
        if engine.has_unfinished():
            total += sum(1 for o in engine.step() if o.token_id is not None)
        elif i < len(pending):
            time.sleep(max(0.0, pending[i].arrival_s - (time.perf_counter() - t0)))
    return time.perf_counter() - t0, total


@torch.inference_mode()
def run_limit(loaded: LoadedModel, work: list[Work]) -> tuple[float, int]:
    from transformers import DynamicCache

    model = loaded.model
    t0 = time.perf_counter()
    width = max(len(w.prompt) for w in work)
    ids = torch.zeros(len(work), width, dtype=torch.long)
    mask = torch.zeros(len(work), width, dtype=torch.long)
    for r, w in enumerate(work):
        ids[r, width - len(w.prompt):] = torch.tensor(w.prompt)
        mask[r, width - len(w.prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    cache_arg = cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{cache_arg: cache})
    next_ids = out.logits[:, -1].argmax(-1)
    remaining = torch.tensor([w.num_output_tokens - 1 for w in work])
    lengths = mask.sum(-1)
    total = len(work)
    while True:
        alive = (remaining > 0).nonzero().flatten()
        if len(alive) == 0:
            break
        if len(alive) < mask.shape[0]:
            cache.batch_select_indices(alive)
            mask, next_ids, remaining, lengths = mask[alive], next_ids[alive], remaining[alive], lengths[alive]
        mask = torch.cat([mask, torch.ones(len(alive), 1, dtype=torch.long)], dim=1)
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=lengths[:, None],
                    use_cache=True, **{cache_arg: cache})
        next_ids = out.logits[:, -1].argmax(-1)
        lengths = lengths + 1
        remaining = remaining - 1
        total += len(alive)
    return time.perf_counter() - t0, total


@torch.inference_mode()
def run_sequential(loaded: LoadedModel, work: list[Work]) -> tuple[float, int]:
    t0 = time.perf_counter()
    total = 0
    for w in work:
        out = loaded.model.generate(
            torch.tensor([w.prompt]), attention_mask=torch.ones(1, len(w.prompt), dtype=torch.long),
            max_new_tokens=w.num_output_tokens, min_new_tokens=w.num_output_tokens, do_sample=False)
        total += out.shape[1] - len(w.prompt)
    return time.perf_counter() - t0, total


def run_generate_batch(loaded: LoadedModel, work: list[Work]) -> tuple[float, int]:
    """transformers' own continuous batching: the manager behind ``generate_batch``, fed every
    request with its own ``max_new_tokens`` (one ``generate_batch`` call per output length was
    slower still: it cannot mix lengths in one batch)."""
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=max(w.num_output_tokens for w in work), do_sample=False,
                          eos_token_id=-1, pad_token_id=0)
    manager = loaded.model.init_continuous_batching(generation_config=gc)
    manager.start()
    try:
        t0 = time.perf_counter()
        pending = sorted(enumerate(work), key=lambda iw: iw[1].arrival_s)
        for i, w in pending:
            delay = w.arrival_s - (time.perf_counter() - t0)
            if delay > 0:
                time.sleep(delay)
            manager.add_request(w.prompt, request_id=f"r{i}", max_new_tokens=w.num_output_tokens)
        done = total = 0
        while done < len(work):
            result = manager.get_result(timeout=120)
            if result is None:
                raise TimeoutError("transformers' continuous batching produced nothing for 120 s")
            if result.is_finished():
                done += 1
                total += len(result.generated_tokens)
        return time.perf_counter() - t0, total
    finally:
        manager.stop(block=True)


def _median(runs: list[tuple[float, int]]) -> tuple[float, int]:
    return statistics.median(secs for secs, _ in runs), runs[0][1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="alternating runs of the limit and the engine")
    parser.add_argument("--model", default="", help="checkpoint dir (default: write the tiny model)")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--skip-sequential", action="store_true")
    parser.add_argument("--skip-generate-batch", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    model_dir = args.model
    if not model_dir:
        from unbroken.tinymodel import write_tiny_model

        model_dir = str(write_tiny_model(tempfile.mkdtemp(prefix="tiny-qwen-"), shape="tiny"))
    cfg = ReplicaConfig.model_validate({
        "model": {"path": model_dir, "quantization": args.quantization},
        "engine": {"max_num_seqs": 64, "max_prefill_tokens_per_step": 512},
    })
    loaded = load_model(cfg.model, progress=lambda _: None)
    vocab = len(loaded.tokenizer)
    work = make_workload(args.requests, vocab, seed=args.seed)
    warm = make_workload(4, vocab, seed=args.seed + 1, arrival_window_s=0.0)
    for w in warm:
        w.num_output_tokens = 8
    run_engine(loaded, cfg, warm)
    run_limit(loaded, warm)

    limit_runs, engine_runs = [], []
    for _ in range(args.rounds):
        limit_runs.append(run_limit(loaded, work))
        engine_runs.append(run_engine(loaded, cfg, work))
    results: dict[str, tuple[float, int]] = {}
    results["limit (batched forward loop)"] = _median(limit_runs)
    results["engine (continuous batching)"] = _median(engine_runs)
    if not args.skip_sequential:
        results["sequential generate()"] = run_sequential(loaded, work)
    if not args.skip_generate_batch:
        results["transformers continuous batching (generate_batch)"] = run_generate_batch(loaded, work)

    num_tokens = sum(w.num_output_tokens for w in work)
    print(f"{args.requests} requests, {sum(len(w.prompt) for w in work)} prompt tokens, {num_tokens} output "
          f"tokens, arriving over 0.5 s; {loaded.quantization} on {loaded.device}, "
          f"{torch.get_num_threads()} threads; limit and engine: median of {args.rounds} alternating runs")
    print("engine / limit per round: " + ", ".join(
        f"{lim[0] / eng[0]:.2f}" for lim, eng in zip(limit_runs, engine_runs)))
    engine_rate = results["engine (continuous batching)"][1] / results["engine (continuous batching)"][0]
    print(f"| method | seconds | tokens | tokens/s | engine / method |")
    print(f"|---|---:|---:|---:|---:|")
    for name, (secs, toks) in results.items():
        assert toks == num_tokens, f"{name} generated {toks} tokens, expected {num_tokens}"
        rate = toks / secs
        print(f"| {name} | {secs:.2f} | {toks} | {rate:.0f} | {engine_rate / rate:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
