"""Recovery from the loss of a gateway: kill -9 one of two gateways at about 70% load and measure
what the clients saw.

A real stack (``unbroken up --gateways 2``, supervised: Redis, two replicas of the tiny model, two
gateway processes). Clients stream greedy answers through the ``openai`` SDK with
``unbroken.client`` (both gateway URLs, the first one preferred). The stack's capacity is measured
first in the same run (``--clients`` closed-loop streams for ``--calibrate-s``); then streams
arrive open-loop at ``--load`` (0.7) of it, and after ``--steady-s`` the first gateway is killed
with SIGKILL. Its clients' streams break and are resumed on the other gateway with
``Last-Event-ID``; new requests go there; the supervisor starts the killed gateway again.

Figures (each against the steady phase of the same run):
- broken streams and their interruption: for every stream running at the kill, the gap between
  the last token before it and the first after it (median, max) — detection and reconnect together;
- service restored: from the kill until completed streams/s (1 s windows) are back to 90% of the
  arrival rate; full capacity: until the killed gateway is back (restarted by the supervisor and
  ready), so both gateways serve again;
- p99 TTFT in the 3 s after the kill vs steady; failed requests; streams whose tokens differ from
  an uninterrupted greedy run (lost or repeated tokens).

``python -m loadtest.bench_gateway_recovery [--clients 4] [--load 0.7] [--steady-s 8] [--after-s 10]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

PROMPTS = ["Tell me a story about a gateway.", "How do replicas recover?", "Write about streams that never break.",
           "Explain resumable server-sent events."]


@dataclass
class StreamRun:
    prompt: int
    t_start: float
    t_end: float = 0.0
    t_first: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    error: str = ""


def _stream(client: Any, prompt: int, max_tokens: int) -> StreamRun:
    run = StreamRun(prompt, time.monotonic())
    try:
        stream = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": PROMPTS[prompt]}],
                                                max_tokens=max_tokens, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        for chunk in stream:
            if not chunk.choices:
                continue
            ids = chunk.choices[0].model_extra.get("token_ids") or []
            if ids:
                now = time.monotonic()
                run.t_first = run.t_first or now
                run.chunk_times.append(now)
                run.token_ids += ids
    except Exception as e:  # noqa: BLE001 - counted as a failed request
        run.error = f"{type(e).__name__}: {e}"[:200]
    run.t_end = time.monotonic()
    return run


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import openai

    import unbroken.client
    from loadtest.chaos import running_stack
    from unbroken.launcher import StackConfig
    from unbroken.procs import http_ok

    config = StackConfig.model_validate({
        "replicas": {"count": args.replicas, "model_path": args.model, "ready_timeout_s": 240},
        "kvsync": {"enabled": False}, "gateway": {"port": 0, "count": 2}, "run": {"stop_timeout_s": 10},
        "supervisor": {"enabled": True},
    })
    with running_stack(config, tempfile.mkdtemp(prefix="bench-gw-recovery-"), progress=lambda *_: None) as stack:
        urls = [u + "/v1" for u in stack.urls]
        local = threading.local()

        def client() -> Any:
            if not hasattr(local, "client"):
                local.client = openai.OpenAI(base_url=urls[0], api_key=stack.api_key or "none", max_retries=0, timeout=120,
                                             http_client=unbroken.client.http_client(urls=urls))
            return local.client

        reference = {}
        ref_client = openai.OpenAI(base_url=urls[1], api_key=stack.api_key or "none", max_retries=0, timeout=120)
        for i in range(len(PROMPTS)):
            r = _stream(ref_client, i, args.max_tokens)
            assert not r.error, r.error
            reference[i] = r.token_ids

        # Capacity: closed-loop clients, completed streams/s after a warm-up.
        done: list[StreamRun] = []
        stop = threading.Event()

        def closed_loop(k: int) -> None:
            i = k
            while not stop.is_set():
                done.append(_stream(client(), i % len(PROMPTS), args.max_tokens))
                i += 1

        threads = [threading.Thread(target=closed_loop, args=(k,), daemon=True) for k in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.warmup_s)
        t_cal = time.monotonic()
        time.sleep(args.calibrate_s)
        capacity = sum(1 for r in done if r.t_end >= t_cal and not r.error) / args.calibrate_s
        stop.set()
        for t in threads:
            t.join(timeout=180)
        rate = args.load * capacity
        if rate <= 0:
            raise SystemExit("calibration completed no stream: nothing to measure")

        # Open loop at ``rate``; the kill after ``steady_s``; the supervisor brings the gateway back.
        runs: list[StreamRun] = []
        back_s: list[float] = []
        with ThreadPoolExecutor(max_workers=64) as pool:
            t0 = time.monotonic()
            end = t0 + args.steady_s + args.after_s
            t_kill = t0 + args.steady_s
            killed = False
            old_pid = stack.gateways[0].pid
            n = 0
            while time.monotonic() < end:
                now = time.monotonic()
                if not killed and now >= t_kill:
                    stack.gateways[0].kill()
                    killed = True
                    t_kill = time.monotonic()

                    def watch() -> None:
                        while time.monotonic() < t_kill + 120:
                            g = stack.gateways[0]
                            if g.pid != old_pid and g.alive() and http_ok(stack.urls[0] + "/readyz", timeout_s=0.5):
                                back_s.append(time.monotonic() - t_kill)
                                return
                            time.sleep(0.05)

                    pool.submit(watch)
                due = t0 + n / rate
                if now < due:
                    time.sleep(min(due - now, 0.05))
                    continue
                pool.submit(lambda i=n: runs.append(_stream(client(), i % len(PROMPTS), args.max_tokens)))
                n += 1
    return _figures(runs, reference, t0 + args.warmup_s, t_kill, back_s[0] if back_s else None, args,
                    capacity=capacity, rate=rate)


def _figures(runs: list[StreamRun], reference: dict[int, list[int]], t_steady: float, t_kill: float,
             back_s: float | None, args: argparse.Namespace, *, capacity: float, rate: float) -> dict[str, Any]:
    failed = [r for r in runs if r.error]
    wrong = [r for r in runs if not r.error and r.token_ids != reference[r.prompt]]
    steady = [r for r in runs if t_steady <= r.t_start and r.t_end < t_kill]
    steady_rate = len(steady) / max(1e-9, t_kill - t_steady)
    broken = [r for r in runs if r.t_start < t_kill < r.t_end and r.chunk_times and r.chunk_times[0] < t_kill]
    gaps = []
    for r in broken:
        after = [t for t in r.chunk_times if t >= t_kill]
        before = [t for t in r.chunk_times if t < t_kill]
        if after and before:
            gaps.append(after[0] - before[-1])
    # service restored: the first 1 s window after the kill completing >= 90% of the arrival rate
    ends = sorted(r.t_end for r in runs if not r.error)
    restored_s = None
    w = 1.0
    t = t_kill
    while t < (ends[-1] if ends else t_kill):
        if sum(1 for e in ends if t <= e < t + w) / w >= 0.9 * rate:
            restored_s = max(0.0, t + w - t_kill)
            break
        t += 0.1
    ttft_steady = [r.t_first - r.t_start for r in steady if r.t_first]
    ttft_recovery = [r.t_first - r.t_start for r in runs if r.t_first and t_kill <= r.t_start < t_kill + 3]
    return {
        "num_requests": len(runs), "num_failed": len(failed), "failures": [r.error for r in failed][:5],
        "num_wrong_tokens": len(wrong), "num_broken_streams": len(broken),
        "interruption_median_s": statistics.median(gaps) if gaps else None,
        "interruption_max_s": max(gaps) if gaps else None,
        "steady_streams_per_s": steady_rate, "service_restored_s": restored_s, "full_capacity_s": back_s,
        "capacity_streams_per_s": capacity, "load_streams_per_s": rate,
        "ttft_p99_steady_s": _pct(ttft_steady, 0.99), "ttft_p99_recovery_s": _pct(ttft_recovery, 0.99),
        "clients": args.clients, "max_tokens": args.max_tokens, "load": args.load,
    }


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report(f: dict[str, Any]) -> str:
    lines = [f"gateway kill -9 at {f['load']:.0%} load: capacity {f['capacity_streams_per_s']:.2f} streams/s "
             f"({f['clients']} closed-loop clients), load {f['load_streams_per_s']:.2f} streams/s open-loop x "
             f"{f['max_tokens']} tokens, 2 gateways on one Redis, supervised; cpus: {os.cpu_count()}", "",
             "| requests | failed | lost/repeated tokens | streams broken by the kill | interruption median (s) "
             "| interruption max (s) | service restored (s) | full capacity: killed gateway back (s) "
             "| TTFT p99 steady (s) | TTFT p99 recovery (s) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {f['num_requests']} | {f['num_failed']} | {f['num_wrong_tokens']} | {f['num_broken_streams']} "
             f"| {_fmt(f['interruption_median_s'])} | {_fmt(f['interruption_max_s'])} "
             f"| {_fmt(f['service_restored_s'], 1)} | {_fmt(f['full_capacity_s'], 2)} "
             f"| {_fmt(f['ttft_p99_steady_s'])} | {_fmt(f['ttft_p99_recovery_s'])} |",
             "", f"steady: {f['steady_streams_per_s']:.2f} streams/s completed; targets: 0 failed, "
             "0 lost/repeated tokens"]
    if f["failures"]:
        lines += ["failures: " + "; ".join(f["failures"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_gateway_recovery",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="closed-loop streaming clients of the calibration")
    parser.add_argument("--load", type=float, default=0.7, help="open-loop arrivals, as a fraction of the capacity")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--model", default="models/tiny-qwen", help="checkpoint (the tiny model is written if missing)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--calibrate-s", type=float, default=8.0, help="closed-loop phase measuring the capacity")
    parser.add_argument("--steady-s", type=float, default=8.0, help="load before the kill")
    parser.add_argument("--after-s", type=float, default=10.0, help="load after the kill")
    args = parser.parse_args(argv)
    figures = run(args)
    print(report(figures))
    return 0 if figures["num_failed"] == 0 and figures["num_wrong_tokens"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
