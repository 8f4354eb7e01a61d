"""Benchmark: the turn after a failover, with kvsync restore vs re-prefill vs a warm replica; and
decode throughput with replication on vs off.

Everything runs in one process on the real engine API (:class:`replica.engine.AsyncEngine`),
sharing one loaded model, with real kvsync sidecar processes and a real redis-server:

- replica A (kvsync on, sidecar A) serves turn 1 of a session of N tokens and publishes it;
- the *warm* figure is turn 2 on A, which still holds the session's KV;
- the *restore* figure is turn 2 on replica B (kvsync on, sidecar B, same Redis), which has never
  seen the session: it fetches the snapshot, imports it and prefills only the new message;
- the *re-prefill* figure is turn 2 on replica C (kvsync off), which recomputes the whole context.

All three must produce the same greedy tokens, and B must report the restored tokens as cached.
TTFT is the time from ``generate()`` to the first token. Decode throughput is measured on a
batch of concurrent sessions generating a fixed number of tokens, with replication on (a snapshot
every ``snapshot_every_tokens`` tokens, sent to the sidecar) and off, alternating runs; an "on" run
ends when its snapshots are in Redis, and the CPU time replication took meanwhile (sidecar A,
redis-server, the replica's sender thread; read from /proc) is printed beside the decode's own: on
a noisy machine it bounds the cost more tightly than the difference of two throughputs.

Usage: ``python -m loadtest.bench_failover [--model DIR] [--lengths 512 2048 4096]
[--new-tokens 32] [--decode-seqs 4] [--decode-tokens 128] [--repeats 2]``. Without ``--model`` a
Qwen3-0.6B-shaped random checkpoint is written to a temporary directory first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kvsync.client import KVSyncClient
from kvsync.testing import metric_value, start_sidecar, wait_replicated
from replica.config import ReplicaConfig
from replica.engine import AsyncEngine
from replica.loader import LoadedModel, load_model
from replica.protocol import GenerationRequest, SamplingParams
from unbroken.procs import start_redis

BLOCK_TOKENS = 64


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process (or one of its threads) so far, from /proc."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class TurnResult:
    ttft_s: float
    total_s: float
    token_ids: list[int]
    num_cached: int
    cache_source: str | None


async def run_turn(engine: AsyncEngine, request_id: str, prompt: list[int], session_id: str | None,
                   max_tokens: int) -> TurnResult:
    t0 = time.perf_counter()
    ttft = 0.0
    tokens: list[int] = []
    cached, source = 0, None
    req = GenerationRequest(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                               ignore_eos=True), session_id=session_id)
    async for out in engine.generate(req):
        if out.error:
            raise RuntimeError(f"{request_id}: {out.error}")
        if not tokens and out.token_id is not None:
            ttft = time.perf_counter() - t0
            cached, source = out.num_cached_prompt_tokens, out.cache_source
        if out.token_id is not None:
            tokens.append(out.token_id)
    return TurnResult(ttft, time.perf_counter() - t0, tokens, cached, source)


def make_config(model_dir: str, max_len: int, kvsync_url: str | None, threads: int) -> ReplicaConfig:
    kv_bytes = 6 * 1024 ** 3
    return ReplicaConfig.model_validate({
        "model": {"path": model_dir, "quantization": "nf4", "max_model_len": max_len, "num_threads": threads},
        "engine": {"kv_cache_bytes": kv_bytes, "max_prefill_tokens_per_step": 1024, "max_num_seqs": 16},
        "kvsync": {"enabled": kvsync_url is not None, "sidecar_url": kvsync_url or "http://127.0.0.1:1",
                   "block_tokens": BLOCK_TOKENS, "snapshot_every_tokens": 64, "fetch_timeout_s": 300.0},
    })


async def bench_ttft(engines: dict[str, AsyncEngine], client_a: KVSyncClient, sidecar_a: str, sidecar_b: str,
                     lengths: list[int], new_tokens: int, vocab: int) -> list[dict[str, float]]:
    rng = random.Random(0)
    rows = []
    for n in lengths:
        sid = f"session-{n}"
        prompt1 = [rng.randrange(10, vocab - 10) for _ in range(n)]
        turn1 = await run_turn(engines["A"], f"{sid}-t1", prompt1, sid, max_tokens=2)
        sent_before = client_a.num_published + client_a.num_refused + client_a.num_failed
        engines["A"].finish_turn(sid, [{"role": "user", "content": f"{n} tokens"}])
        t0 = time.perf_counter()
        while client_a.num_published + client_a.num_refused + client_a.num_failed == sent_before:
            await asyncio.sleep(0.01)  # the engine thread hands the snapshot over, the client sends it
        await asyncio.to_thread(wait_replicated, sidecar_a, 600.0, client_a)
        replicate_s = time.perf_counter() - t0
        prompt2 = prompt1 + turn1.token_ids + [rng.randrange(10, vocab - 10) for _ in range(new_tokens)]
        results = {}
        sidecar_b_before = metric_value(sidecar_b, "unbroken_kvsync_restore_seconds_sum")
        for name, label in (("A", "warm"), ("B", "restore"), ("C", "prefill")):
            results[label] = await run_turn(engines[name], f"{sid}-t2-{name}", prompt2, sid, max_tokens=4)
        sidecar_read_s = metric_value(sidecar_b, "unbroken_kvsync_restore_seconds_sum") - sidecar_b_before
        fetch_import_s = engines["B"].last_restore_s
        ref = results["warm"].token_ids
        for label, r in results.items():
            if r.token_ids != ref:
                raise AssertionError(f"{n} tokens: {label} produced {r.token_ids}, warm produced {ref}")
        restored = results["restore"]
        if restored.cache_source != "restored":
            print(f"  client A: published {client_a.num_published} refused {client_a.num_refused} "
                  f"failed {client_a.num_failed} dropped {client_a.num_dropped}", flush=True)
        if restored.cache_source != "restored" or restored.num_cached < n:
            raise AssertionError(f"{n} tokens: replica B did not restore (cached {restored.num_cached}, "
                                 f"source {restored.cache_source}); outcomes {engines['B'].restore_outcomes}")
        row = {"tokens": len(prompt2), "warm_s": results["warm"].ttft_s, "restore_s": restored.ttft_s,
               "prefill_s": results["prefill"].ttft_s, "restored_tokens": restored.num_cached,
               "replicate_s": replicate_s, "fetch_import_s": fetch_import_s, "sidecar_read_s": sidecar_read_s}
        print(f"  {n:>5} tokens: warm {row['warm_s']:.3f}s  restore {row['restore_s']:.3f}s "
              f"(restored {restored.num_cached})  re-prefill {row['prefill_s']:.3f}s  "
              f"[restore: sidecar read+check {sidecar_read_s:.2f}s, fetch+import {fetch_import_s:.2f}s; "
              f"turn 1 was in Redis {replicate_s:.2f}s after it ended]", flush=True)
        rows.append(row)
    return rows


@dataclass
class DecodeRuns:
    on: list[float]  # tokens/s
    off: list[float]
    published: int
    replication_cpu_s: dict[str, float]  # by part, over all "on" runs, until their snapshots were in Redis
    decode_cpu_s: float  # this process's CPU over the same "on" runs, less the sender thread's


async def bench_decode(engine_on: AsyncEngine, engine_off: AsyncEngine, client_on: KVSyncClient, sidecar_on: str,
                       replication_cpu: Callable[[], dict[str, float]], num_seqs: int, num_tokens: int, prompt_tokens: int,
                       repeats: int, vocab: int) -> DecodeRuns:
    rng = random.Random(1)

    async def one_run(engine: AsyncEngine, tag: str) -> float:
        prompts = [[rng.randrange(10, vocab - 10) for _ in range(prompt_tokens)] for _ in range(num_seqs)]
        first: list[float] = []
        last: list[float] = []

        async def seq(i: int) -> None:
            req = GenerationRequest(f"{tag}-{i}", prompts[i], SamplingParams(
                max_tokens=num_tokens, temperature=0.0, ignore_eos=True), session_id=f"{tag}-{i}")
            count = 0
            async for out in engine.generate(req):
                if out.token_id is not None:
                    count += 1
                    if count == 1:
                        first.append(time.perf_counter())
            last.append(time.perf_counter())

        await asyncio.gather(*(seq(i) for i in range(num_seqs)))
        # Decode phase only: from the moment every sequence has its first token to the last token.
        return num_seqs * (num_tokens - 1) / (max(last) - max(first))

    runs = DecodeRuns([], [], 0, {}, 0.0)
    published_before = client_on.num_published

    async def run_on(r: int) -> None:
        before, own0 = replication_cpu(), time.process_time()
        runs.on.append(await one_run(engine_on, f"on{r}"))
        # Its snapshots reach Redis before anything else runs: no replication work spills over.
        await asyncio.to_thread(wait_replicated, sidecar_on, 600.0, client_on)
        after, own1 = replication_cpu(), time.process_time()
        for part in after:
            runs.replication_cpu_s[part] = runs.replication_cpu_s.get(part, 0.0) + after[part] - before[part]
        # The sender thread is this process's, but it is replication's work, not decoding's.
        runs.decode_cpu_s += (own1 - own0) - (after["sender thread"] - before["sender thread"])

    for r in range(repeats):
        # Alternate which mode goes first: a round's first run has been seen to be the slower one.
        if r % 2:
            await run_on(r)
            runs.off.append(await one_run(engine_off, f"off{r}"))
        else:
            runs.off.append(await one_run(engine_off, f"off{r}"))
            await run_on(r)
        print(f"  decode run {r + 1}: replication off {runs.off[-1]:.2f} tok/s, on {runs.on[-1]:.2f} tok/s",
              flush=True)
    runs.published = client_on.num_published - published_before
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_failover", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: write a qwen3-0.6b-shaped random one)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens of the new message in turn 2")
    parser.add_argument("--decode-seqs", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-prompt-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="decode runs per mode")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        model_dir = args.model
        if model_dir is None:
            from unbroken.tinymodel import write_tiny_model

            print("writing a qwen3-0.6b-shaped random checkpoint ...", flush=True)
            model_dir = str(write_tiny_model(Path(tmp) / "model", shape="qwen3-0.6b", seed=0))
        max_len = max(args.lengths) + args.new_tokens + 64
        redis_proc, redis_url = start_redis(log_path=Path(tmp) / "redis.log",
                                            extra=["--maxmemory", "0", "--proto-max-bulk-len", "1gb"])
        sidecars = []
        clients: list[KVSyncClient] = []
        engines: dict[str, AsyncEngine] = {}
        try:
            settings = {"store.block_tokens": BLOCK_TOKENS, "store.max_memory_bytes": 16 * 1024 ** 3,
                        "writer.max_pending_bytes": 8 * 1024 ** 3, "writer.fetch_timeout_s": 300}
            for name in ("A", "B"):
                proc, url = start_sidecar(redis_url, log_path=Path(tmp) / f"kvsync-{name}.log", settings=settings)
                sidecars.append((proc, url))
            cfg_a = make_config(model_dir, max_len, sidecars[0][1], args.threads)
            loaded: LoadedModel = load_model(cfg_a.model, progress=lambda m: print("  " + m, flush=True))
            vocab = int(loaded.model.config.vocab_size)
            per_token = loaded.kv_bytes_per_token
            print(f"model: {loaded.num_layers} layers, {loaded.num_kv_heads} KV heads x {loaded.head_dim}, "
                  f"{str(loaded.dtype).removeprefix('torch.')} KV = {per_token / 1024:.0f} KiB/token; "
                  f"torch threads {torch.get_num_threads()}", flush=True)
            for name, url in (("A", sidecars[0][1]), ("B", sidecars[1][1]), ("C", None)):
                cfg = make_config(model_dir, max_len, url, args.threads)
                client = None
                if url is not None:
                    client = KVSyncClient(url, block_tokens=BLOCK_TOKENS, max_pending=8, post_timeout_s=300)
                    client.start()
                    clients.append(client)
                engines[name] = AsyncEngine(cfg, client, loaded=loaded)
            return asyncio.run(_run(args, engines, clients, sidecars, vocab, per_token, redis_proc.pid))
        finally:
            for c in clients:
                c.close()
            for proc, _ in sidecars:
                proc.stop()
            redis_proc.stop()


async def _run(args: argparse.Namespace, engines: dict[str, AsyncEngine], clients: list[KVSyncClient],
               sidecars: list, vocab: int, per_token: int, redis_pid: int) -> int:
    for e in engines.values():
        await e.start()
    try:
        print("TTFT of the turn after a failover (turn 2 = whole context + a new message):", flush=True)
        rows = await bench_ttft(engines, clients[0], sidecars[0][1], sidecars[1][1], args.lengths, args.new_tokens, vocab)
        print()
        print("| session tokens | warm replica TTFT (s) | restore TTFT (s) | re-prefill TTFT (s) | "
              "re-prefill / restore | restore / warm | KV restored (MiB) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['tokens']} | {row['warm_s']:.3f} | {row['restore_s']:.3f} | {row['prefill_s']:.2f} | "
                  f"{row['prefill_s'] / row['restore_s']:.1f}x | {row['restore_s'] / row['warm_s']:.2f}x | "
                  f"{row['restored_tokens'] * per_token / 2 ** 20:.0f} |")
        if not args.skip_decode:
            print(f"\ndecode throughput, {args.decode_seqs} sequences x {args.decode_tokens} tokens after "
                  f"{args.decode_prompt_tokens}-token prompts, snapshot every 64 tokens:", flush=True)
            sender = clients[0].sender_thread_id
            sidecar_pid = sidecars[0][0].pid

            def replication_cpu() -> dict[str, float]:
                return {"sidecar": cpu_seconds(sidecar_pid), "redis-server": cpu_seconds(redis_pid),
                        "sender thread": cpu_seconds(os.getpid(), sender) if sender is not None else 0.0}

            runs = await bench_decode(engines["A"], engines["C"], clients[0], sidecars[0][1], replication_cpu,
                                      args.decode_seqs, args.decode_tokens, args.decode_prompt_tokens,
                                      args.repeats, vocab)
            m_on, m_off = statistics.median(runs.on), statistics.median(runs.off)
            print()
            print("| replication | decode tokens/s (median) | runs | snapshots sent |")
            print("|---|---:|---|---:|")
            print(f"| off | {m_off:.2f} | {', '.join(f'{x:.2f}' for x in runs.off)} | 0 |")
            print(f"| on | {m_on:.2f} | {', '.join(f'{x:.2f}' for x in runs.on)} | {runs.published} |")
            print(f"replication cost: {100 * (1 - m_on / m_off):.1f}% of decode throughput")
            rep = sum(runs.replication_cpu_s.values())
            parts = ", ".join(f"{k} {v:.2f} s" for k, v in runs.replication_cpu_s.items())
            print(f"replication CPU during the 'on' runs: {rep:.2f} s ({parts}) against {runs.decode_cpu_s:.2f} s "
                  f"of decoding: {100 * rep / max(runs.decode_cpu_s, 1e-9):.1f}%")
    finally:
        for e in engines.values():
            await e.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
