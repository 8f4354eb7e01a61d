"""A trivial replica that speaks the replica contract, for gateway tests and benchmarks.

It serves ``POST /v1/chat/completions`` and ``/v1/completions`` (stream and non-stream),
``GET /v1/models``, ``/health``, ``/state`` and ``/metrics``, with fake but deterministic tokens:
the completion of a prompt is a fixed sequence of ids that depends only on the prompt text (as
greedy decoding would), each id ``t`` has the text ``"t{t} "``, and every choice carries its
``token_ids``. ``resume_token_ids`` is honoured: they must be the prompt's own first tokens (else
400, so a gateway that loses or repeats a token is caught) and generation continues after them.

Knobs (:class:`MockKnobs`), settable at start or at run time through ``POST /mock/knobs``:
``response_delay_ms``, ``token_interval_ms``, ``fail_rate``, ``status_override``,
``stall_after_tokens``, ``crash_after_tokens`` (the connection is cut; with ``exit_on_crash`` the
process exits, like ``kill -9``), ``fail_first_n``, ``kv_bytes_free``, ``draining``.
``GET /mock/stats`` counts what it saw.

In-process: ``async with MockReplica(...) as m`` (or ``start_in_thread()`` for sync code).
Subprocess: ``python -m loadtest.mock_replica --port N [--replica-id ID] [--token-interval-ms MS] ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Any

import orjson
from aiohttp import web

from unbroken.contract.heartbeat import ReplicaStateReport
from unbroken.contract.openai import parse_body
from unbroken.errors import UnbrokenError

VOCAB = 1000


@dataclass
class MockKnobs:
    response_delay_ms: float = 0.0  # before the response starts
    token_interval_ms: float = 0.0  # between stream chunks (and per token for non-stream)
    fail_rate: float = 0.0  # share of generation requests answered 500
    status_override: int = 0  # answer every generation request with this status (0 = off)
    stall_after_tokens: int = -1  # stop sending (connection kept open) after N tokens (-1 = never)
    crash_after_tokens: int = -1  # cut the connection after N tokens (-1 = never)
    exit_on_crash: bool = False  # on crash_after_tokens, exit the process (subprocess mode)
    fail_first_n: int = 0  # the next N generation requests get 500
    stall_duration_s: float = 30.0  # how long a stall lasts at most
    kv_bytes_free: int = 1 << 30
    kv_bytes_per_token: int = 1024
    draining: bool = False  # /state says "draining" and generation requests get 503 draining
    heartbeat_delay_ms: float = 0.0  # /state answers this late


def prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        parts = []
        for m in body.get("messages") or []:
            c = m.get("content")
            parts.append(f"{m.get('role')}:{c if isinstance(c, str) else orjson.dumps(c).decode()}")
        return "\n".join(parts)
    p = body.get("prompt")
    return p if isinstance(p, str) else orjson.dumps(p).decode()


def expected_token(prompt: str, position: int) -> int:
    """The id at output ``position`` for ``prompt`` (what every mock replica generates)."""
    base = zlib.crc32(prompt.encode())
    return 10 + (base + 7919 * position) % VOCAB


def token_text(token_id: int) -> str:
    return f"t{token_id} "


def expected_completion(prompt: str, num_tokens: int) -> tuple[list[int], str]:
    ids = [expected_token(prompt, k) for k in range(num_tokens)]
    return ids, "".join(token_text(t) for t in ids)


class MockReplica:
    def __init__(self, knobs: MockKnobs | None = None, *, replica_id: str = "mock", model: str = "qwen",
                 adapters: tuple[str, ...] = (), shared_token: str = "", seed: int = 0) -> None:
        self.knobs = knobs or MockKnobs()
        self.replica_id = replica_id
        self.model = model
        self.adapters = list(adapters)
        self.shared_token = shared_token
        self.started_at_s = time.time()
        self._rng = random.Random(seed)
        self.num_requests = 0
        self.num_resumed = 0
        self.num_auth_failures = 0
        self.num_bad_resumes = 0
        self.num_running = 0
        self.num_tokens = 0
        self.last_resume_len = 0
        self.seen_request_ids: list[str] = []
        self.host = "127.0.0.1"
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/state", self._state)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/mock/stats", self._stats)
        app.router.add_get("/mock/knobs", self._get_knobs)
        app.router.add_post("/mock/knobs", self._set_knobs)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> "MockReplica":
        self._runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.host = host
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "MockReplica":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> "MockReplica":
        """Run on a loop of its own in a daemon thread (for synchronous tests)."""
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self.start(host, port))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"mock-{self.replica_id}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("mock replica did not start")
        return self

    def stop_thread(self) -> None:
        if self._loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self.stop(), self._loop)
        fut.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop = None

    # -- endpoints -------------------------------------------------------------------------------

    def _models_list(self) -> list[str]:
        return [self.model, *(f"{self.model}:{a}" for a in self.adapters)]

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": int(self.started_at_s), "owned_by": "mock"}
                for m in self._models_list()]
        return web.json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        if self.knobs.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ok"})

    async def _state(self, request: web.Request) -> web.Response:
        if self.knobs.heartbeat_delay_ms:
            await asyncio.sleep(self.knobs.heartbeat_delay_ms / 1000.0)
        k = self.knobs
        report = ReplicaStateReport(
            replica_id=self.replica_id, pid=os.getpid(), model=self.model, adapters=list(self.adapters),
            quantization="none", dtype="float32", device="cpu", status="draining" if k.draining else "ready",
            queue_length=self.num_running, num_running=self.num_running, num_waiting=0,
            kv_bytes_used=self.num_running * 100 * k.kv_bytes_per_token, kv_bytes_free=k.kv_bytes_free,
            kv_bytes_per_token=k.kv_bytes_per_token, device_memory_free_bytes=0, tokens_per_s=0.0,
            sessions=[], max_model_len=4096, started_at_s=self.started_at_s)
        return web.Response(body=orjson.dumps(report.to_dict()), content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=f"mock_requests_total {self.num_requests}\n", content_type="text/plain")

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"num_requests": self.num_requests, "num_resumed": self.num_resumed,
                                  "num_auth_failures": self.num_auth_failures, "num_running": self.num_running,
                                  "num_bad_resumes": self.num_bad_resumes, "last_resume_len": self.last_resume_len,
                                  "num_tokens": self.num_tokens})

    async def _get_knobs(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.knobs))

    async def _set_knobs(self, request: web.Request) -> web.Response:
        data = await request.json()
        names = {f.name for f in fields(MockKnobs)}
        for key, value in data.items():
            if key not in names:
                return web.json_response({"error": {"message": f"unknown knob {key}", "type": "invalid_request_error",
                                                    "param": key, "code": "invalid_value"}}, status=400)
            setattr(self.knobs, key, value)
        return web.json_response(asdict(self.knobs))

    @staticmethod
    def _error(status: int, message: str, code: str, etype: str = "server_error",
               headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(body=orjson.dumps({"error": {"message": message, "type": etype, "param": None,
                                                          "code": code}}),
                            status=status, content_type="application/json", headers=headers)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        k = self.knobs
        self.num_requests += 1
        rid = request.headers.get("X-Request-ID")
        if rid is not None and len(self.seen_request_ids) < 10_000:
            self.seen_request_ids.append(rid)
        if self.shared_token and request.headers.get("Authorization") != f"Bearer {self.shared_token}":
            self.num_auth_failures += 1
            return self._error(401, "bad replica token", "invalid_api_key", "authentication_error")
        if k.response_delay_ms:
            await asyncio.sleep(k.response_delay_ms / 1000.0)
        if k.draining:
            return self._error(503, "draining", "draining", "overloaded_error", {"Retry-After": "1"})
        if k.status_override:
            code = "upstream_error" if k.status_override >= 500 else "invalid_request"
            return self._error(k.status_override, f"status override {k.status_override}", code,
                               "server_error" if k.status_override >= 500 else "invalid_request_error")
        if k.fail_first_n > 0:
            k.fail_first_n -= 1
            return self._error(500, "injected failure", "internal_error")
        if k.fail_rate and self._rng.random() < k.fail_rate:
            return self._error(500, "injected failure", "internal_error")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(400, "bad json", "invalid_request", "invalid_request_error")
        chat = request.path.endswith("chat/completions")
        try:  # the replica's own parser: the same precedence, refusals and n = 1
            req = parse_body("chat" if chat else "completion", body, default_model=self.model)
        except UnbrokenError as e:
            return web.Response(body=orjson.dumps(e.to_dict()), status=e.status, content_type="application/json")
        model = req.model
        if model not in self._models_list():
            return self._error(404, f"model {model!r} not found", "model_not_found", "invalid_request_error")
        prompt = prompt_text(body)
        max_tokens = req.max_tokens or 16
        n = 1
        resume = req.resume_token_ids
        if resume:
            self.num_resumed += 1
            self.last_resume_len = len(resume)
            if list(resume) != [expected_token(prompt, i) for i in range(len(resume))]:
                self.num_bad_resumes += 1
                return self._error(400, "resume_token_ids are not this prompt's tokens", "invalid_request",
                                   "invalid_request_error")
        start = len(resume)
        num_prompt_tokens = max(1, len(prompt) // 4)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.replica_id}-{self.num_requests}"
        created = int(time.time())
        self.num_running += 1
        try:
            if body.get("stream"):
                return await self._stream(request, body, chat, prompt, start, max_tokens, n, rid, created, model,
                                          num_prompt_tokens)
            return await self._complete(request, chat, prompt, start, max_tokens, n, rid, created, model,
                                        num_prompt_tokens)
        finally:
            self.num_running -= 1

    def _crash(self, request: web.Request) -> None:
        if self.knobs.exit_on_crash:
            os._exit(1)
        if request.transport is not None:
            request.transport.abort()

    async def _stall(self, request: web.Request) -> None:
        deadline = time.monotonic() + self.knobs.stall_duration_s
        while time.monotonic() < deadline:
            if request.transport is None or request.transport.is_closing():
                return
            await asyncio.sleep(0.02)

    async def _complete(self, request: web.Request, chat: bool, prompt: str, start: int, max_tokens: int, n: int,
                        rid: str, created: int, model: str, num_prompt_tokens: int) -> web.StreamResponse:
        k = self.knobs
        count = max(0, max_tokens - start)
        if k.token_interval_ms and count:
            await asyncio.sleep(k.token_interval_ms * count / 1000.0)
        if 0 <= k.crash_after_tokens < count:
            self._crash(request)
            return web.Response(status=500)
        if 0 <= k.stall_after_tokens < count:
            await self._stall(request)
        ids = [expected_token(prompt, p) for p in range(start, start + count)]
        text = "".join(token_text(t) for t in ids)
        self.num_tokens += count
        choices = []
        for i in range(n):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": "length", "token_ids": ids})
            else:
                choices.append({"index": i, "text": text, "finish_reason": "length", "token_ids": ids})
        out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
               "model": model, "choices": choices,
               "usage": {"prompt_tokens": num_prompt_tokens, "completion_tokens": start + count * n,
                         "total_tokens": num_prompt_tokens + start + count * n}}
        return web.Response(body=orjson.dumps(out), content_type="application/json",
                            headers={"X-Replica-ID": self.replica_id})

    async def _stream(self, request: web.Request, body: dict[str, Any], chat: bool, prompt: str, start: int,
                      max_tokens: int, n: int, rid: str, created: int, model: str,
                      num_prompt_tokens: int) -> web.StreamResponse:
        k = self.knobs
        resp = web.StreamResponse(headers={"X-Replica-ID": self.replica_id})
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            d: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
            if usage is not None:
                d["usage"] = usage
            return b"data: " + orjson.dumps(d) + b"\n\n"

        try:
            if chat:
                await resp.write(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None, "token_ids": []} for i in range(n)]))
            sent = 0
            for pos in range(start, max_tokens):
                if sent == k.crash_after_tokens:
                    self._crash(request)
                    return resp
                if sent == k.stall_after_tokens:
                    await self._stall(request)
                    return resp
                if k.token_interval_ms:
                    await asyncio.sleep(k.token_interval_ms / 1000.0)
                elif sent % 16 == 15:
                    await asyncio.sleep(0)  # let others run between bursts
                t = expected_token(prompt, pos)
                if chat:
                    choices = [{"index": i, "delta": {"content": token_text(t)}, "finish_reason": None,
                                "token_ids": [t]} for i in range(n)]
                else:
                    choices = [{"index": i, "text": token_text(t), "finish_reason": None, "token_ids": [t]}
                               for i in range(n)]
                await resp.write(chunk(choices))
                sent += 1
                self.num_tokens += 1
            if chat:
                final = [{"index": i, "delta": {}, "finish_reason": "length", "token_ids": []} for i in range(n)]
            else:
                final = [{"index": i, "text": "", "finish_reason": "length", "token_ids": []} for i in range(n)]
            await resp.write(chunk(final))
            so = body.get("stream_options") or {}
            if so.get("include_usage"):
                total = max_tokens * n
                await resp.write(chunk([], {"prompt_tokens": num_prompt_tokens, "completion_tokens": total,
                                            "total_tokens": num_prompt_tokens + total}))
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionError, RuntimeError):
            pass  # the gateway went away
        return resp


async def _announce(mock: MockReplica, redis_url: str, ttl_s: float, advertise_url: str) -> None:
    import redis.asyncio as aioredis

    r = aioredis.from_url(redis_url)
    key = f"unbroken:replica:{mock.replica_id}"
    value = orjson.dumps({"replica_id": mock.replica_id, "url": advertise_url, "model": mock.model,
                          "adapters": mock.adapters, "started_at_s": mock.started_at_s})
    try:
        while True:
            try:
                await r.set(key, value, px=int(ttl_s * 1000))
            except Exception:  # noqa: BLE001 - Redis gone: keep serving
                pass
            await asyncio.sleep(ttl_s / 3)
    finally:
        try:
            await r.delete(key)
            await r.aclose()
        except Exception:  # noqa: BLE001
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.mock_replica", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica-id", default="")
    parser.add_argument("--model", default="qwen")
    parser.add_argument("--adapter", action="append", default=[])
    parser.add_argument("--shared-token", default="")
    parser.add_argument("--registry-redis-url", default="", help="announce in the Redis registry")
    parser.add_argument("--registry-ttl-s", type=float, default=3.0)
    for f in fields(MockKnobs):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default) if f.type != "bool" else int,
                            default=None)
    args = parser.parse_args(argv)
    knobs = MockKnobs()
    for f in fields(MockKnobs):
        v = getattr(args, f.name)
        if v is not None:
            setattr(knobs, f.name, bool(v) if isinstance(f.default, bool) else v)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    mock = MockReplica(knobs, replica_id=args.replica_id or f"mock-{args.port}", model=args.model,
                       adapters=tuple(args.adapter), shared_token=args.shared_token)

    async def run() -> None:
        await mock.start(args.host, args.port)
        print(f"mock replica {mock.replica_id} on {mock.url}", flush=True)
        tasks = []
        if args.registry_redis_url:
            tasks.append(asyncio.create_task(_announce(mock, args.registry_redis_url, args.registry_ttl_s, mock.url)))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for t in tasks:
            t.cancel()
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        await mock.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
