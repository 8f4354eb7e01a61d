"""One emulated engine server, in-process (``async with make_emulator("vllm") as e``) or in a
thread (``start_in_thread()``), on a free port.

Generation is deterministic and checkable: the answer to a prompt is a fixed sequence of words
``"w<n> "`` (one token each) that depends only on the prompt's own text (the messages' contents for
chat, the prompt for completions). A continuation request — chat ending with an assistant message
and ``continue_final_message: true``, or a completion prompt that ends with some of those words —
continues after the words it already has, so a correct text-mode resume reproduces the whole
answer and a glued second beginning shows. ``num_bad_prefixes`` counts prefixes that are not the
answer's own beginning.

Knobs (:class:`EmulatorKnobs`, settable at run time), one per misbehaviour:
``rate_limit_n`` (429, with ``Retry-After: retry_after_s`` unless it is None), ``fail_5xx_n`` /
``fail_5xx_always``, ``reset_n`` (TCP reset before any header), ``hang_n`` (no response at all),
``first_token_delay_ms`` (headers, then a slow first token), ``cut_after_tokens`` (connection cut
mid-answer), ``stall_after_tokens`` (stream stops, connection kept), ``malformed_after_tokens`` (an
event that is not JSON), ``end_without_done_after_tokens`` (the response ends cleanly with neither
finish nor ``[DONE]``), ``omit_done`` (finish chunk, then the end without ``[DONE]``),
``max_model_len`` (``context_length_exceeded`` in the engine's wording), ``refuse_word``
(content-policy refusal), ``refuse_prefix`` (an assistant prefix is refused with 400), ``down``
(health fails and generation resets: set and clear it to flap), ``token_interval_ms``.
A fault with ``_n`` applies to the next N generation requests; ``_after_tokens`` faults to every
stream until set back to -1, unless ``faults_once`` (then the first affected request only).

Token mode (with a ``token_model``, :mod:`loadtest.emulators.tokens`): vLLM's ``/v1/completions``
with a ``prompt`` of token ids (and ``return_token_ids``) and SGLang's ``/generate`` with
``input_ids`` answer with the model's greedy ids, in each engine's streamed form (the flavors cite
the versions); the same knobs apply, counted in tokens. ``stop`` strings are not applied there (the
gateway cuts them); ``num_token_requests`` and ``token_prompts`` record what came.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

_WORDS_AT_END = re.compile(r"(?:w\d+ )+$")


@dataclass
class EmulatorKnobs:
    token_interval_ms: float = 0.0
    first_token_delay_ms: float = 0.0
    rate_limit_n: int = 0
    retry_after_s: float | None = 1.0
    fail_5xx_n: int = 0
    fail_5xx_always: bool = False
    reset_n: int = 0
    hang_n: int = 0
    cut_after_tokens: int = -1
    stall_after_tokens: int = -1
    malformed_after_tokens: int = -1
    end_without_done_after_tokens: int = -1
    omit_done: bool = False
    faults_once: bool = True
    max_model_len: int = 4096
    refuse_word: str = ""
    refuse_prefix: bool = False
    down: bool = False
    num_running_override: int = -1  # metrics: report this many running (for routing tests)
    kv_usage: float = 0.1  # metrics: KV share reported


def word(seed: int, i: int) -> str:
    return f"w{(seed + i * 7919) % 997} "


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode())


def expected_text(base: str, num_tokens: int, start: int = 0) -> str:
    s = seed_of(base)
    return "".join(word(s, i) for i in range(start, start + num_tokens))


def prompt_base(body: dict[str, Any], chat: bool) -> tuple[str, str]:
    """``(base, prefix)``: the text the answer depends on, and the part of the answer the request
    already carries (an assistant prefix, or answer words at the end of a completion prompt)."""
    if chat:
        msgs = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        prefix = ""
        if msgs and msgs[-1].get("role") == "assistant" and body.get("continue_final_message"):
            prefix = str(msgs[-1].get("content") or "")
            msgs = msgs[:-1]
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in msgs), prefix
    prompt = str(body.get("prompt") or "")
    m = _WORDS_AT_END.search(prompt)
    if m is None:
        return prompt, ""
    return prompt[:m.start()], prompt[m.start():]


class EngineEmulator:
    """The shared server; a :class:`~loadtest.emulators.flavors.Flavor` supplies what differs."""

    def __init__(self, flavor: Any, knobs: EmulatorKnobs | None = None, *, model: str = "qwen",
                 name: str = "", token_model: Any = None) -> None:
        self.flavor = flavor
        self.token_model = token_model  # loadtest.emulators.tokens.TokenModel: answers token-id requests
        self.num_token_requests = 0
        self.token_prompts: list[list[int]] = []
        self.knobs = knobs or EmulatorKnobs()
        self.model = model
        self.name = name or flavor.kind
        self.port = 0
        self.num_requests = 0
        self.num_generations = 0  # requests that got a 200
        self.num_continued = 0
        self.num_bad_prefixes = 0
        self.num_running = 0
        self.num_health_polls = 0
        self.last_body: dict[str, Any] | None = None
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        if self.flavor.generate_route:
            app.router.add_post(self.flavor.generate_route, self._generate)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        for path, fn in self.flavor.info_routes.items():
            app.router.add_get(path, self._info(fn))
        return app

    async def start(self, port: int = 0) -> "EngineEmulator":
        self._runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "EngineEmulator":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start_in_thread(self) -> "EngineEmulator":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self.start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"emulator-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("emulator did not start")
        return self

    def stop_thread(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop = None

    # -- routes ----------------------------------------------------------------------------------

    def _info(self, fn: Any) -> Any:
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(fn(self))

        return handler

    async def _models(self, request: web.Request) -> web.Response:
        if self.knobs.down:
            self._reset(request)
            return web.Response(status=500)
        return web.json_response(self.flavor.models_body(self))

    async def _health(self, request: web.Request) -> web.Response:
        self.num_health_polls += 1
        if self.knobs.down:
            return web.Response(status=503)
        return self.flavor.health_response(self)

    async def _metrics(self, request: web.Request) -> web.Response:
        k = self.knobs
        running = self.num_running if k.num_running_override < 0 else k.num_running_override
        return web.Response(text=self.flavor.metrics_text(self, running, 0, k.kv_usage),
                            content_type="text/plain")

    @staticmethod
    def _reset(request: web.Request) -> None:
        """Close the connection with a TCP reset (SO_LINGER 0), before any byte of a response."""
        tr = request.transport
        if tr is None:
            return
        sock = tr.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        tr.abort()

    def _take(self, name: str) -> bool:
        n = getattr(self.knobs, name)
        if n > 0:
            setattr(self.knobs, name, n - 1)
            return True
        return False

    def _fault_at(self, name: str) -> int:
        v = getattr(self.knobs, name)
        if v >= 0 and self.knobs.faults_once:
            setattr(self.knobs, name, -1)
        return v

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        k, fl = self.knobs, self.flavor
        self.num_requests += 1
        if k.down or self._take("reset_n"):
            self._reset(request)
            return web.Response(status=500)
        if self._take("hang_n"):
            await asyncio.sleep(3600)
        if self._take("rate_limit_n"):
            headers = {"Retry-After": f"{k.retry_after_s:g}"} if k.retry_after_s is not None else {}
            return fl.error(429, "rate limited", "overloaded", headers)
        if k.fail_5xx_always or self._take("fail_5xx_n"):
            return fl.error(500, "injected engine failure", "internal")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return fl.error(400, "the body is not JSON", "validation")
        if not isinstance(body, dict):
            return fl.error(400, "the body is not an object", "validation")
        self.last_body = body
        chat = request.path.endswith("chat/completions")
        if body.get("model", self.model) != self.model:
            return fl.error(404, f"The model `{body.get('model')}` does not exist.", "not_found")
        token_req = fl.token_request(request.path, body)
        if token_req is not None:
            return await self._generate_tokens(request, body, *token_req)
        base, prefix = prompt_base(body, chat)
        if k.refuse_word and k.refuse_word in base:
            return fl.content_refusal()
        if prefix and chat and (k.refuse_prefix or not fl.accepts_prefix):
            return fl.error(400, "continue_final_message is not supported", "validation")
        seed = seed_of(base)
        start = 0
        if prefix:
            self.num_continued += 1
            start = len(prefix.split())
            if prefix != expected_text(base, start):
                self.num_bad_prefixes += 1
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        num_prompt = len(base.split()) + start + 4
        if num_prompt + max_tokens > k.max_model_len:
            return fl.context_error(k.max_model_len, num_prompt, max_tokens)
        self.num_generations += 1
        self.num_running += 1
        try:
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.name}-{self.num_requests}"
            words = [word(seed, i) for i in range(start, start + max_tokens)]
            if body.get("stream"):
                return await self._stream(request, body, chat, rid, words, num_prompt)
            if k.token_interval_ms:
                await asyncio.sleep(k.token_interval_ms * len(words) / 1000.0)
            return web.json_response(fl.completion_body(self, chat, rid, "".join(words), num_prompt, len(words)))
        finally:
            self.num_running -= 1

    async def _generate_tokens(self, request: web.Request, body: dict[str, Any], ids: Any,
                               max_new: int) -> web.StreamResponse:
        k, fl = self.knobs, self.flavor
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            return fl.error(400, "the prompt must be a non-empty list of token ids", "validation")
        if self.token_model is None:
            return fl.error(400, "this server has no model for token-id prompts", "validation")
        if not body.get("stream"):
            return fl.error(400, "the emulator answers token-id prompts as streams only", "validation")
        if len(ids) + max_new > k.max_model_len:
            return fl.context_error(k.max_model_len, len(ids), max_new)
        self.num_token_requests += 1
        self.token_prompts.append(list(ids))
        self.num_generations += 1
        self.num_running += 1
        try:
            gen = await asyncio.to_thread(self.token_model.generate, ids, max_new)
            rid = f"{self.name}-{self.num_requests}"
            created = int(time.time())
            per_token = fl.token_events(self, body, rid, created, ids, gen, max_new)
            closing = fl.token_closing(self, body, rid, created, ids, gen)
            return await self._send_events(request, [], per_token, closing)
        finally:
            self.num_running -= 1

    async def _stream(self, request: web.Request, body: dict[str, Any], chat: bool, rid: str, words: list[str],
                      num_prompt: int) -> web.StreamResponse:
        fl = self.flavor
        created = int(time.time())
        opening = [fl.chunk(self, chat, rid, created, {"role": "assistant", "content": ""}, None)] if chat else []
        per_token = [fl.chunk(self, chat, rid, created, {"content": w} if chat else w, None) for w in words]
        closing = [fl.chunk(self, chat, rid, created, {} if chat else "", "length")]
        so = body.get("stream_options")
        if isinstance(so, dict) and so.get("include_usage"):
            closing.append(fl.usage_chunk(self, chat, rid, created, num_prompt, len(words)))
        return await self._send_events(request, opening, per_token, closing)

    async def _send_events(self, request: web.Request, opening: list[dict[str, Any]],
                           per_token: list[dict[str, Any]], closing: list[dict[str, Any]]) -> web.StreamResponse:
        """Stream ``opening``, one event per token, then ``closing`` and ``[DONE]``, with the faults
        the knobs ask for (counted in tokens)."""
        k = self.knobs
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        rid = str(per_token[0].get("id", "")) if per_token else ""
        cut, stall = self._fault_at("cut_after_tokens"), self._fault_at("stall_after_tokens")
        bad, early = self._fault_at("malformed_after_tokens"), self._fault_at("end_without_done_after_tokens")

        async def send(obj: dict[str, Any]) -> None:
            await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")

        try:
            for ev in opening:
                await send(ev)
            if k.first_token_delay_ms:
                await asyncio.sleep(k.first_token_delay_ms / 1000.0)
            for i, ev in enumerate(per_token):
                if i == cut:
                    self._reset(request)
                    return resp
                if i == stall:
                    while request.transport is not None and not request.transport.is_closing():
                        await asyncio.sleep(0.02)
                    return resp
                if i == bad:
                    await resp.write(b"data: {\"id\": \"" + rid.encode() + b"\", \"choices\": [{\"delta\n\n")
                if i == early:
                    await resp.write_eof()
                    return resp
                if k.token_interval_ms:
                    await asyncio.sleep(k.token_interval_ms / 1000.0)
                await send(ev)
            for ev in closing:
                await send(ev)
            if not k.omit_done:
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return resp
