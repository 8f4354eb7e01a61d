"""Benchmark: recovery from a replica killed with -9 under load: a fresh start, a start forked from
the zygote, and a warm standby.

For each mode (no standby and no zygote: a fresh ``python -m replica``; no standby, replicas forked
from the zygote; ``--standby 1``) a local stack is started (``unbroken up``'s
:class:`~unbroken.launcher.Stack`, supervisor on) with ``--replicas`` replicas in rotation. In the
same run the stack's capacity is calibrated first: closed-loop streams at ``--concurrency`` for
``--calibrate-s`` seconds give the maximal requests/s. Then streams arrive open-loop at
``--load-fraction`` (70%) of that rate; after ``--kill-at-s`` seconds replica r0 is killed -9,
and the load goes on until the rotation is full again plus ``--tail-s`` (at most ``--max-s``).
A thread polls the gateway's ``/admin/replicas`` every 10 ms.

Printed per mode: detection time (kill -> the gateway marks r0 not healthy), time to full capacity
(kill -> the rotation has its size again: a promoted standby, or r0 restarted by the supervisor),
p99 TTFT in steady state (requests started before the kill) and during recovery (started between
the kill and full capacity, at least ``--recovery-window-min-s``), failed requests, and streams
whose greedy tokens differ from the reference (lost or repeated tokens). Before the stacks, a
replica's start is timed to /health 200 four ways: cold (its checkpoint's pages dropped from the
page cache with ``posix_fadvise(DONTNEED)``, for its own files only), warm (right after), forked
from a ready zygote (``python -m replica.zygote``: imports done, checkpoint read), and forked from
a zygote that loaded the weights (``--load-weights``: the child inherits them).

Targets: 0 failed; with standby, full capacity <= 1 s after the kill; without, <= the replica's
load time + 1 s.

Then (unless ``--no-gateway-kill``) the gateway kill at the same load fraction:
:mod:`loadtest.bench_gateway_recovery` (two gateways, one killed -9 under open-loop streams through
``unbroken.client``): interruption, service restored, full capacity, p99 TTFT, failed requests and
lost/repeated tokens.

Usage: ``python -m loadtest.bench_recovery [--model DIR] [--replicas 2] [--max-tokens 32]``.
Without ``--model`` the tiny model is written to a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from loadtest import bench_gateway_recovery
from unbroken.launcher import Stack, StackConfig
from unbroken.procs import ManagedProcess, free_port, python_module_cmd
from unbroken.tinymodel import write_tiny_model
from unbroken.zygote import ForkedProcess, ZygoteUnavailable, ping

PROMPT = [{"role": "user", "content": "Tell me a story about a robot."}]


@dataclass
class Record:
    t_start: float
    t_first: float | None = None
    t_end: float = 0.0
    ok: bool = False
    token_ids: list[int] = field(default_factory=list)
    error: str = ""

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_start


def p99(xs: list[float]) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(0.99 * len(xs) + 0.999) - 1))]


async def stream_once(session: aiohttp.ClientSession, url: str, max_tokens: int) -> Record:
    rec = Record(t_start=time.monotonic())
    body = {"model": "qwen", "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return rec
            done = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                obj = orjson.loads(data)
                if "error" in obj:
                    rec.error = str(obj["error"])
                    return rec
                for ch in obj.get("choices") or []:
                    ids = ch.get("token_ids") or []
                    if ids and rec.t_first is None:
                        rec.t_first = time.monotonic()
                    rec.token_ids.extend(ids)
            rec.ok = done
            if not done:
                rec.error = "stream ended without [DONE]"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    finally:
        rec.t_end = time.monotonic()
    return rec


async def calibrate(url: str, concurrency: int, duration_s: float, max_tokens: int) -> float:
    """Closed loop: ``concurrency`` streams back to back for ``duration_s``; completed streams/s."""
    done = 0
    stop_at = time.monotonic() + duration_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                if (await stream_once(s, url, max_tokens)).ok:
                    done += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.monotonic() - t0)


class CapacityWatch:
    """Polls ``/admin/replicas`` every ``interval_s`` on a thread: (time, {replica: state})."""

    def __init__(self, url: str, interval_s: float = 0.01) -> None:
        self.url = url
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import urllib.request

        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url + "/admin/replicas", timeout=1) as r:
                    body = orjson.loads(r.read())
                self.samples.append((time.monotonic(), {e["replica_id"]: e["state"] for e in body["replicas"]}))
            except (OSError, ValueError, KeyError):
                pass
            self._stop.wait(self.interval_s)

    def start(self) -> "CapacityWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def detected_at(self, after: float, replica: str) -> float | None:
        return next((t for t, st in self.samples if t >= after and st.get(replica) != "healthy"), None)

    def full_at(self, after: float, size: int) -> float | None:
        return next((t for t, st in self.samples
                     if t >= after and sum(1 for v in st.values() if v == "healthy") >= size), None)


async def open_loop(stack: Stack, rate: float, max_tokens: int, kill_at_s: float, tail_s: float, max_s: float,
                    size: int, watch: CapacityWatch) -> tuple[list[Record], float]:
    """Streams at ``rate``/s; kill -9 r0 at ``kill_at_s``; until full capacity + ``tail_s``."""
    records: list[Record] = []
    tasks: list[asyncio.Task[Record]] = []
    t0 = time.monotonic()
    t_kill = 0.0
    end_at = t0 + max_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                     connector=aiohttp.TCPConnector(limit=0)) as s:
        n = 0
        while time.monotonic() < end_at:
            due = t0 + n / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(stream_once(s, stack.url, max_tokens)))
            n += 1
            if not t_kill and time.monotonic() - t0 >= kill_at_s:
                t_kill = time.monotonic()
                stack.replica("r0").process.kill()
            if t_kill:
                full = watch.full_at(watch.detected_at(t_kill, "r0") or float("inf"), size)
                if full is not None:
                    end_at = min(end_at, full + tail_s)
        records = list(await asyncio.gather(*tasks))
    return records, t_kill


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to drop the cached pages of the checkpoint's files (ours only)."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def time_replica_start(model: Path, run_dir: Path, cold: bool) -> float:
    if cold:
        drop_page_cache(model)
    port = free_port()
    name = "cold" if cold else "warm"
    p = ManagedProcess(f"start-{name}", python_module_cmd("replica", "--model", str(model), "--port", str(port),
                                                          "--host", "127.0.0.1", "--replica-id", name),
                       log_path=run_dir / f"start-{name}.log", env={"OMP_NUM_THREADS": "1"},
                       ready_url=f"http://127.0.0.1:{port}/health")
    t0 = time.monotonic()
    p.start()
    try:
        p.wait_ready(300)
        return time.monotonic() - t0
    finally:
        p.stop(10)


def time_forked_start(model: Path, run_dir: Path, load_weights: bool) -> float:
    """A zygote is started and waited for (not timed); then a replica forked from it, to /health 200."""
    name = "forked-weights" if load_weights else "forked"
    sock = Path(tempfile.mkdtemp(prefix="bench-zygote-")) / "z.sock"
    env = {"OMP_NUM_THREADS": "1"}
    zygote = ManagedProcess(f"zygote-{name}", python_module_cmd(
        "replica.zygote", "--socket", str(sock), "--model", str(model), *(["--load-weights"] if load_weights else [])),
        log_path=run_dir / f"zygote-{name}.log", env=env).start()
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                ping(sock)
                break
            except ZygoteUnavailable:
                if not zygote.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the zygote did not get ready:\n{zygote.log_tail()}") from None
                time.sleep(0.05)
        port = free_port()
        argv = ["--model", str(model), "--port", str(port), "--host", "127.0.0.1", "--replica-id", name]
        p = ForkedProcess(f"start-{name}", python_module_cmd("replica", *argv), child_argv=argv, zygote_socket=sock,
                          log_path=run_dir / f"start-{name}.log", env=env, ready_url=f"http://127.0.0.1:{port}/health")
        t0 = time.monotonic()
        p.start()
        try:
            assert p.started_via == "zygote", p.fallback_reason
            p.wait_ready(300)
            return time.monotonic() - t0
        finally:
            p.stop(10)
    finally:
        zygote.stop(10)
        shutil.rmtree(sock.parent, ignore_errors=True)


def run_mode(args: argparse.Namespace, model: Path, run_dir: Path, standby: int, zygote: bool) -> dict[str, Any]:
    config = StackConfig.model_validate({
        "replicas": {"count": args.replicas, "standby": standby, "model_path": str(model),
                     "ready_timeout_s": 300, "zygote": zygote},
        "kvsync": {"enabled": args.kvsync},
        "gateway": {"port": 0},
        "run": {"stop_timeout_s": 10},
        # The clients and the capacity watch speak plain HTTP on loopback: no keys to pass around.
        "security": {"auth": False},
    })
    mode = f"standby {standby}" if standby else ("zygote" if zygote else "fresh start")
    with Stack(config, run_dir=run_dir / mode.replace(" ", "-"), progress=lambda *_: None) as stack:
        ref = asyncio.run(_one(stack.url, args.max_tokens))
        assert ref.ok, ref.error
        max_rps = asyncio.run(calibrate(stack.url, args.concurrency, args.calibrate_s, args.max_tokens))
        rate = max(0.5, args.load_fraction * max_rps)
        watch = CapacityWatch(stack.url).start()
        try:
            records, t_kill = asyncio.run(open_loop(stack, rate, args.max_tokens, args.kill_at_s, args.tail_s,
                                                    args.max_s, args.replicas, watch))
        finally:
            watch.stop()
        restarts = [via for rid, via, _ in stack.replica_starts[args.replicas + standby:] if rid == "r0"]
    detected = watch.detected_at(t_kill, "r0")
    full = watch.full_at(detected, args.replicas) if detected is not None else None
    rec_end = max(full or t_kill, t_kill + args.recovery_window_min_s)
    steady = [r.ttft_s for r in records if r.ok and r.t_end < t_kill and r.ttft_s is not None]
    during = [r.ttft_s for r in records if r.ok and t_kill <= r.t_start <= rec_end and r.ttft_s is not None]
    failed = [r for r in records if not r.ok]
    mismatched = [r for r in records if r.ok and r.token_ids != ref.token_ids]
    return {"mode": mode, "restarted_via": ",".join(restarts) or "-", "standby": standby, "max_rps": max_rps, "rate": rate, "requests": len(records),
            "failed": len(failed), "errors": sorted({r.error for r in failed})[:3],
            "mismatched_streams": len(mismatched),
            "detection_s": None if detected is None else detected - t_kill,
            "full_capacity_s": None if full is None else full - t_kill,
            "ttft_p99_steady_s": p99(steady), "ttft_p99_recovery_s": p99(during),
            "num_recovery_requests": len(during)}


async def _one(url: str, max_tokens: int) -> Record:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        return await stream_once(s, url, max_tokens)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.bench_recovery", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: the tiny model in a temporary directory)")
    ap.add_argument("--replicas", type=int, default=2, help="replicas in rotation")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8, help="closed-loop streams for the calibration")
    ap.add_argument("--calibrate-s", type=float, default=8.0)
    ap.add_argument("--load-fraction", type=float, default=0.7)
    ap.add_argument("--kill-at-s", type=float, default=5.0)
    ap.add_argument("--tail-s", type=float, default=3.0)
    ap.add_argument("--max-s", type=float, default=120.0)
    ap.add_argument("--recovery-window-min-s", type=float, default=2.0)
    ap.add_argument("--kvsync", action="store_true", help="start the kvsync sidecars too")
    ap.add_argument("--no-gateway-kill", action="store_true",
                    help="leave out the gateway kill (python -m loadtest.bench_gateway_recovery alone)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        run_dir = Path(tmp)
        model = Path(args.model) if args.model else write_tiny_model(run_dir / "tiny-qwen", shape="tiny", seed=0)
        cold_s = time_replica_start(model, run_dir, cold=True)
        warm_s = time_replica_start(model, run_dir, cold=False)
        forked_s = time_forked_start(model, run_dir, load_weights=False)
        weights_s = time_forked_start(model, run_dir, load_weights=True)
        print(f"replica start to /health 200: cold {cold_s:.2f} s, warm (page cache) {warm_s:.2f} s, "
              f"forked from the zygote {forked_s:.2f} s, forked with the weights {weights_s:.2f} s", flush=True)
        print(f"  cold / warm {cold_s / warm_s:.2f}x; warm / forked {warm_s / forked_s:.1f}x; "
              f"warm / forked with the weights {warm_s / weights_s:.1f}x", flush=True)
        results = [run_mode(args, model, run_dir, standby, zygote)
                   for standby, zygote in ((0, False), (0, True), (1, True))]
    print("\n| mode | r0 restarted | max req/s | load req/s | requests | failed | streams with lost/repeated "
          "tokens | detection (s) | time to full capacity (s) | p99 TTFT steady (s) | p99 TTFT recovery (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['restarted_via']} | {r['max_rps']:.2f} | {r['rate']:.2f} | {r['requests']} "
              f"| {r['failed']} | {r['mismatched_streams']} | {_fmt(r['detection_s'])} "
              f"| {_fmt(r['full_capacity_s'])} | {_fmt(r['ttft_p99_steady_s'])} | {_fmt(r['ttft_p99_recovery_s'])} |")
        if r["errors"]:
            print(f"  errors ({r['mode']}): {r['errors']}")
    f_s, z_s, s_s = (r["full_capacity_s"] for r in results)
    if f_s and z_s and s_s:
        print(f"\ntime to full capacity: zygote / fresh start {z_s / f_s:.3f}x ({f_s / z_s:.1f}x faster); "
              f"standby / fresh start {s_s / f_s:.3f}x; standby / zygote {s_s / z_s:.3f}x")
    ok = all(r["failed"] == 0 and r["mismatched_streams"] == 0 for r in results)
    ok_standby = s_s is not None and s_s <= 1.0
    ok_plain = z_s is not None and z_s <= warm_s + 1.0
    print(f"targets: 0 failed and exact tokens: {'met' if ok else 'MISSED'}; standby <= 1 s: "
          f"{'met' if ok_standby else 'MISSED'}; without a standby (zygote) <= load time ({warm_s:.2f} s) + 1 s: "
          f"{'met' if ok_plain else 'MISSED'} (fresh start: {_fmt(f_s)} s)", flush=True)
    if args.no_gateway_kill:
        return 0
    # The other half of the figures: one of two gateways killed -9 at the same load.
    print("\ngateway kill (python -m loadtest.bench_gateway_recovery):", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        model = Path(args.model) if args.model else write_tiny_model(Path(tmp) / "tiny-qwen", shape="tiny", seed=0)
        return bench_gateway_recovery.main(["--model", str(model), "--replicas", str(args.replicas),
                                            "--max-tokens", str(args.max_tokens), "--load", str(args.load_fraction)])


if __name__ == "__main__":
    raise SystemExit(main())
