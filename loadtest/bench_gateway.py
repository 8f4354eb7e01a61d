"""Gateway overhead benchmark: direct to a trivial replica vs a bare aiohttp pass-through proxy vs
the full gateway, measured in one run on this machine.

Every server is its own process: the mock replica (``loadtest.mock_replica``), the bare proxy
(this module with ``--serve-bare-proxy``: aiohttp + uvloop, one pooled client session, the body
passed through untouched) and the gateway (``python -m gateway`` with every feature on: auth with
hashed keys and per-key limits, session affinity over least-load, breakers, heartbeats, retry
budget, degradation, metrics; Redis for shared state when ``--workers`` > 1). The load generator is
a lean keep-alive HTTP/1.1 client on uvloop (raw protocol, no HTTP library), so it costs the
servers as little CPU as possible.

Figures: requests/s at ``--connections`` (32) for a small non-stream chat request, the median and
p99 latency at one connection and what each hop adds over direct, and SSE chunks/s relayed for
long streams. ``python -m loadtest.bench_gateway [--duration-s 5] [--workers 2]``.

``--stream-state``: the cost of resumable streams instead — gateways on one Redis, alike but for
``streams.resumable`` (event ids, the stream state kept locally), ``streams.state_write_behind`` (the
state written behind to Redis) and ``streams.state_write_on_open``, under a load of short streams:
streams/s, gateway CPU per stream and SSE chunks/s, each variant to its baseline (target: the
write-behind costs <= 5% of streams/s; resumable streams in all, to none, printed too). Two alike
processes differ by up to ~15% on two shared cores, as much as the effect, so ``--processes`` (2)
gateways run per variant, ``--rounds`` (10) rounds measure each once in a rotating order, and the
ratios are taken round by round and reported as a median with quartiles.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from unbroken.procs import ManagedProcess, free_port, python_module_cmd, start_redis

API_KEY = "bench-key"
BODY = orjson.dumps({"model": "qwen", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1})


def _request_bytes(port: int, body: bytes, session_id: str | None = None) -> bytes:
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Length: {len(body)}\r\n")
    if session_id:
        head += f"X-Session-ID: {session_id}\r\n"
    return head.encode() + b"\r\n" + body


class _Conn(asyncio.Protocol):
    """One keep-alive connection sending the same request again as soon as the answer is complete."""

    def __init__(self, request: bytes, latencies: list[float], stop_at: float, done: asyncio.Future[None]) -> None:
        self.request = request
        self.latencies = latencies
        self.stop_at = stop_at
        self.done = done
        self.buf = bytearray()
        self.sent_at = 0.0
        self.errors = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        self.sent_at = time.perf_counter()
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        i = head.find(b"content-length:")
        if i < 0:
            raise RuntimeError(f"response without content-length: {bytes(self.buf[:200])!r}")
        j = head.find(b"\r\n", i)
        length = int(head[i + 15: j if j > 0 else len(head)])
        if len(self.buf) < end + 4 + length:
            return
        if not head.startswith(b"http/1.1 200"):
            self.errors += 1
        del self.buf[: end + 4 + length]
        now = time.perf_counter()
        self.latencies.append(now - self.sent_at)
        if now >= self.stop_at:
            if not self.done.done():
                self.done.set_result(None)
            assert self.transport is not None
            self.transport.close()
            return
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _load(port: int, connections: int, duration_s: float, warmup_s: float = 0.5,
                cpu_pids: list[int] | None = None) -> tuple[float, list[float], int, float]:
    """Requests/s, latencies and errors of the measured phase, and the CPU seconds ``cpu_pids`` used in it."""
    loop = asyncio.get_running_loop()
    cpu_used = 0.0
    for phase, seconds in (("warmup", warmup_s), ("measure", duration_s)):
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds
        conns = []
        futs = []
        for c in range(connections):
            fut = loop.create_future()
            req = _request_bytes(port, BODY, session_id=f"s{c}")
            _, proto = await loop.create_connection(lambda r=req, f=fut: _Conn(r, latencies, stop_at, f),
                                                    "127.0.0.1", port)
            conns.append(proto)
            futs.append(fut)
        t0 = time.perf_counter()
        cpu0 = _cpu_s(cpu_pids) if cpu_pids else 0.0
        await asyncio.wait_for(asyncio.gather(*futs), timeout=seconds + 30)
        elapsed = time.perf_counter() - t0
        cpu_used = _cpu_s(cpu_pids) - cpu0 if cpu_pids else 0.0
    return len(latencies) / elapsed, latencies, sum(c.errors for c in conns), cpu_used


async def _sse_chunks_per_s(port: int, num_streams: int, num_tokens: int) -> float:
    import aiohttp

    body = {"model": "qwen", "messages": [{"role": "user", "content": "stream"}], "max_tokens": num_tokens,
            "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as s:
        async def one() -> int:
            n = 0
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                # Not line by line: the id line each event has when resumable would cost this client,
                # not the server. The last 6 bytes go with the next read (a pattern cut in two).
                tail = b"\n"
                async for chunk in r.content.iter_any():
                    data = tail + chunk
                    n += data.count(b"\ndata: ")
                    tail = data[-6:]
            return n

        await one()  # warm up
        t0 = time.perf_counter()
        counts = await asyncio.gather(*[one() for _ in range(num_streams)])
        return sum(counts) / (time.perf_counter() - t0)


def _proc_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (gateway worker processes are children of the main one)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parents.setdefault(int(fields[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (Linux /proc)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _measure_round(port: int, hop_pids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    rps, lat, errors, cpu_s = await _load(port, args.connections, args.duration_s, cpu_pids=hop_pids)
    cpu_per_req_us = cpu_s / max(1, len(lat)) * 1e6
    _, lat1, errors1, _ = await _load(port, 1, args.duration_s)
    return {"rps": rps, "p50_ms": statistics.median(lat1) * 1000, "p99_ms": _pct(lat1, 0.99) * 1000,
            "cpu_us_per_req": cpu_per_req_us, "errors": errors + errors1}


# -- the bare proxy# -- the bare proxy ----------------------------------------------------------------------------------


def serve_bare_proxy(port: int, upstream: str) -> None:
    import aiohttp
    import uvloop
    from aiohttp import web

    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session: aiohttp.ClientSession = request.app["session"]
        async with session.post(upstream + request.path, data=body,
                                headers={"Content-Type": "application/json"}) as up:
            if up.headers.get("Content-Type", "").startswith("text/event-stream"):
                resp = web.StreamResponse(status=up.status)
                resp.content_type = "text/event-stream"
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                return resp
            data = await up.read()
            return web.Response(body=data, status=up.status, content_type="application/json")

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/v1/chat/completions", handler)
    app.router.add_get("/health", lambda r: web.json_response({"status": "ok"}))
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- the run -----------------------------------------------------------------------------------------


async def _stream_load(port: int, connections: int, duration_s: float, num_tokens: int,
                       cpu_pids: list[int]) -> tuple[float, float, int]:
    """Streams/s of ``connections`` clients each streaming ``num_tokens``-token answers back to back,
    the CPU seconds per stream of ``cpu_pids``, and errors."""
    import aiohttp

    body = orjson.dumps({"model": "qwen", "messages": [{"role": "user", "content": "stream"}],
                         "max_tokens": num_tokens, "stream": True, "ignore_eos": True, "temperature": 0})
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    errors = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}",
                                              "Content-Type": "application/json"}) as s:
        async def one(stop_at: float) -> int:
            nonlocal errors
            n = 0
            while time.perf_counter() < stop_at:
                async with s.post(url, data=body) as r:
                    data = await r.read()
                    if r.status != 200 or not data.endswith(b"data: [DONE]\n\n"):
                        errors += 1
                n += 1
            return n

        await asyncio.gather(*[one(time.perf_counter() + 0.5) for _ in range(connections)])  # warm up
        cpu0 = _cpu_s(cpu_pids)
        t0 = time.perf_counter()
        counts = await asyncio.gather(*[one(t0 + duration_s) for _ in range(connections)])
        elapsed = time.perf_counter() - t0
        n = sum(counts)
        return n / elapsed, (_cpu_s(cpu_pids) - cpu0) / max(1, n), errors


STREAM_STATE_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("off", {"resumable": False}),
    ("resumable, not written behind", {"resumable": True, "state_write_behind": False}),
    ("on", {"resumable": True}),
    ("on, no write at open", {"resumable": True, "state_write_on_open": False}),
]
# (what, variant, baseline): the ratios printed, each taken round by round
STREAM_STATE_RATIOS = [
    ("the write-behind to Redis", "on", "resumable, not written behind"),
    ("the write-behind without the write at open", "on, no write at open", "resumable, not written behind"),
    ("resumable streams in all (event ids, local state, write-behind)", "on", "off"),
    ("resumable streams, kept locally only", "resumable, not written behind", "off"),
]


def run_stream_state(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Streams/s, gateway CPU per stream and SSE chunks/s with the stream state on and off
    (``--stream-state``): ``--processes`` alike gateways per variant, every gateway measured once per
    round in a rotating order; the ratios are taken round by round (a busy moment hits the gateways
    of one round alike) and their median reported with the spread."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-state-"))
    procs: list[ManagedProcess] = []
    try:
        mock_port = free_port()
        procs.append(ManagedProcess("mock", python_module_cmd("loadtest.mock_replica", "--port", str(mock_port),
                                                              "--replica-id", "bench"),
                                    log_path=tmp / "mock.log", ready_url=f"http://127.0.0.1:{mock_port}/health").start())
        redis_proc, redis_url = start_redis(log_path=tmp / "redis.log")
        procs.append(redis_proc)
        targets = []  # (variant, port, pid)
        for k in range(args.processes):
            for i, (name, streams) in enumerate(STREAM_STATE_VARIANTS):
                port = free_port()
                cfg_path = tmp / f"gateway-{i}-{k}.yaml"
                _gateway_config(cfg_path, 1, streams=streams)
                procs.append(ManagedProcess(f"{name} #{k + 1}", python_module_cmd(
                    "gateway", "--config", str(cfg_path), "--port", str(port), "--replica",
                    f"http://127.0.0.1:{mock_port}", "--redis-url", redis_url),
                    log_path=tmp / f"gateway-{i}-{k}.log", env={"UNBROKEN_LOG_LEVEL": "WARNING"},
                    ready_url=f"http://127.0.0.1:{port}/readyz").start())
                targets.append((name, port, procs[-1].pid))
        for p in procs:
            p.wait_ready(60)
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # pragma: no cover
            pass
        # per variant, per round: one measurement per process
        runs: dict[str, list[list[dict[str, float]]]] = {n: [[] for _ in range(args.rounds)]
                                                         for n, _ in STREAM_STATE_VARIANTS}
        errors = dict.fromkeys(runs, 0)
        for i in range(args.rounds):
            order = targets[i % len(targets):] + targets[:i % len(targets)]  # rotate who goes first
            for name, port, pid in order:
                sps, cpu, errs = asyncio.run(_stream_load(port, args.connections, args.duration_s,
                                                          args.stream_tokens, _proc_tree(pid)))
                chunks = asyncio.run(_sse_chunks_per_s(port, args.sse_streams, args.sse_tokens))
                runs[name][i].append({"streams_per_s": sps, "cpu_us_per_stream": cpu * 1e6,
                                      "sse_chunks_per_s": chunks})
                errors[name] += errs
            print(f"  round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        keys = ("streams_per_s", "cpu_us_per_stream", "sse_chunks_per_s")
        results: list[dict[str, Any]] = []
        for name, _ in STREAM_STATE_VARIANTS:
            r: dict[str, Any] = {"target": name, "errors": errors[name], "processes": args.processes}
            for k in keys:
                r[k] = statistics.median(statistics.fmean(m[k] for m in rnd) for rnd in runs[name])
            r["cpu_us_per_stream_by_process"] = [
                statistics.median(rnd[p]["cpu_us_per_stream"] for rnd in runs[name]) for p in range(args.processes)]
            results.append(r)
        for what, name, base in STREAM_STATE_RATIOS:
            r = {"cost_of": what, "of": name, "to": base}
            for k in keys:
                r[k] = _quartiles([statistics.fmean(m[k] for m in rnd) / statistics.fmean(m[k] for m in b)
                                   for rnd, b in zip(runs[name], runs[base])])
            results.append(r)
        return results
    finally:
        for p in reversed(procs):
            p.stop()


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """The lower quartile, the median and the upper quartile."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def report_stream_state(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"stream state benchmark: {args.processes} gateway processes per variant, {args.rounds} rounds; "
             f"per gateway and round {args.connections} connections x {args.duration_s:g}s of "
             f"{args.stream_tokens}-token streams, then {args.sse_streams} streams x {args.sse_tokens} tokens; "
             f"cpus: {os.cpu_count()}", "",
             "| gateway | streams/s | gateway CPU per stream (us), by process | SSE chunks/s | errors |",
             "|---|---|---|---|---|"]
    for r in results:
        if "cost_of" in r:
            continue
        by_proc = ", ".join(f"{v:.0f}" for v in r["cpu_us_per_stream_by_process"])
        lines.append(f"| {r['target']} | {r['streams_per_s']:.1f} | {r['cpu_us_per_stream']:.0f} ({by_proc}) | "
                     f"{r['sse_chunks_per_s']:.0f} | {r['errors']} |")

    def ratio(r: dict[str, Any], k: str) -> str:
        q1, q2, q3 = r[k]
        return f"{q2:.3f} ({q1:.3f}-{q3:.3f})"

    lines += ["", "ratios taken round by round; median over rounds (quartiles):", "",
              "| cost of | variant / baseline | streams/s | CPU per stream | SSE chunks/s |", "|---|---|---|---|---|"]
    for r in results:
        if "cost_of" in r:
            lines.append(f"| {r['cost_of']} | {r['of']} / {r['to']} | "
                         f"{ratio(r, 'streams_per_s')} | {ratio(r, 'cpu_us_per_stream')} | "
                         f"{ratio(r, 'sse_chunks_per_s')} |")
    lines += ["", "target: streams/s of the write-behind to Redis >= 0.95"]
    return "\n".join(lines)


def _gateway_config(path: Path, workers: int, **sections: Any) -> None:
    cfg = {
        "auth": {"enabled": True, "api_keys": [{"name": "bench", "sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                                                "requests_per_minute": 100_000_000,
                                                "tokens_per_minute": 1_000_000_000}],
                 "admin_key_sha256": hashlib.sha256(b"admin").hexdigest()},
        "routing": {"policy": "least_load", "session_affinity": True, "adapter_affinity": True},
        "degradation": {"overload_inflight_per_replica": 1024, "queue_max_depth": 256},
        "server": {"workers": workers},
        **sections,
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    procs: list[ManagedProcess] = []
    try:
        mock_port = free_port()
        procs.append(ManagedProcess("mock", python_module_cmd("loadtest.mock_replica", "--port", str(mock_port),
                                                              "--replica-id", "bench"),
                                    log_path=tmp / "mock.log", ready_url=f"http://127.0.0.1:{mock_port}/health").start())
        proxy_port = free_port()
        procs.append(ManagedProcess("bare-proxy", python_module_cmd("loadtest.bench_gateway", "--serve-bare-proxy",
                                                                    "--port", str(proxy_port), "--upstream",
                                                                    f"http://127.0.0.1:{mock_port}"),
                                    log_path=tmp / "proxy.log", ready_url=f"http://127.0.0.1:{proxy_port}/health").start())
        redis_url = ""
        if args.workers > 1:
            redis_proc, redis_url = start_redis(log_path=tmp / "redis.log")
            procs.append(redis_proc)
        gw_port = free_port()
        _gateway_config(tmp / "gateway.yaml", args.workers)
        gw_args = ["--config", str(tmp / "gateway.yaml"), "--port", str(gw_port),
                   "--replica", f"http://127.0.0.1:{mock_port}", "--workers", str(args.workers)]
        if redis_url:
            gw_args += ["--redis-url", redis_url]
        procs.append(ManagedProcess("gateway", python_module_cmd("gateway", *gw_args), log_path=tmp / "gateway.log",
                                    env={"UNBROKEN_LOG_LEVEL": "WARNING"},
                                    ready_url=f"http://127.0.0.1:{gw_port}/readyz").start())
        for p in procs:
            p.wait_ready(60)
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # pragma: no cover
            pass
        targets = [("direct", mock_port, procs[0].pid), ("bare proxy", proxy_port, procs[1].pid),
                   ("gateway", gw_port, procs[-1].pid)]
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
        for i in range(args.rounds):  # interleaved, so a busy moment hits every target alike
            for name, port, pid in targets:
                rounds[name].append(asyncio.run(_measure_round(port, _proc_tree(pid), args)))
            print(f"  round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        results = []
        for name, port, _ in targets:
            rs = rounds[name]
            results.append({"target": name, **{k: statistics.median(r[k] for r in rs)
                                               for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")},
                            "errors": sum(r["errors"] for r in rs),
                            "sse_chunks_per_s": asyncio.run(_sse_chunks_per_s(port, args.sse_streams, args.sse_tokens))})
        return results
    finally:
        for p in reversed(procs):
            p.stop()


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    direct, proxy, gw = results
    lines = [f"gateway benchmark: {args.connections} connections x {args.duration_s:.0f}s, 1 connection x "
             f"{args.duration_s:.0f}s, median of {args.rounds} interleaved rounds; {args.sse_streams} streams x {args.sse_tokens} tokens; gateway workers: "
             f"{args.workers}; cpus: {os.cpu_count()}",
             "",
             "| target | requests/s @%d conn | hop CPU per request (us) | p50 @1 conn (ms) | p99 @1 conn (ms) "
             "| added p50 (ms) | added p99 (ms) | SSE chunks/s | errors |" % args.connections,
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['target']} | {r['rps']:.0f} | {r['cpu_us_per_req']:.0f} | {r['p50_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | "
                     f"{r['p50_ms'] - direct['p50_ms']:.3f} | {r['p99_ms'] - direct['p99_ms']:.3f} | "
                     f"{r['sse_chunks_per_s']:.0f} | {r['errors']} |")
    lines += ["",
              f"gateway / bare proxy throughput: {gw['rps'] / proxy['rps']:.2f} (target >= 0.80)",
              f"gateway added median latency: {gw['p50_ms'] - direct['p50_ms']:.3f} ms (target <= 0.40); "
              f"bare proxy added {proxy['p50_ms'] - direct['p50_ms']:.3f} ms",
              f"gateway / bare proxy SSE chunks/s: {gw['sse_chunks_per_s'] / proxy['sse_chunks_per_s']:.2f}",
              f"CPU per request, gateway (all workers) / bare proxy: "
              f"{gw['cpu_us_per_req'] / max(1e-9, proxy['cpu_us_per_req']):.2f} "
              f"(hop processes only: the mock's CPU is not counted for the proxy or the gateway)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, help="per target, per round, per load level "
                                                         "(default 3; --stream-state 2)")
    parser.add_argument("--connections", type=int, help="default 32; --stream-state 16")
    parser.add_argument("--rounds", type=int, help="interleaved rounds, medians reported (default 3; "
                                                   "--stream-state 10)")
    parser.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    parser.add_argument("--sse-streams", type=int, default=4)
    parser.add_argument("--sse-tokens", type=int, default=5000)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--stream-state", action="store_true",
                        help="measure the cost of resumable streams (state on vs off) instead")
    parser.add_argument("--stream-tokens", type=int, default=32, help="tokens per stream (--stream-state)")
    parser.add_argument("--processes", type=int, default=2, help="alike gateways per variant (--stream-state)")
    parser.add_argument("--serve-bare-proxy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    stream_state = bool(args.stream_state)
    for name, plain, ss in (("duration_s", 3.0, 2.0), ("connections", 32, 16), ("rounds", 3, 10)):
        if getattr(args, name) is None:
            setattr(args, name, ss if stream_state else plain)
    if args.serve_bare_proxy:
        serve_bare_proxy(args.port, args.upstream)
        return 0
    if args.stream_state:
        results = run_stream_state(args)
        print(report_stream_state(results, args))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    results = run(args)
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
