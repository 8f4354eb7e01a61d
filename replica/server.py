"""The replica's HTTP layer: OpenAI endpoints over :class:`replica.engine.AsyncEngine`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (SSE streaming or not),
``GET /v1/models``, ``GET|PUT /v1/sessions/{id}/kv``, ``GET /health``, ``GET /state``,
``GET /metrics``. See ``docs/replica.md`` for the behaviour and ``docs/protocol.md`` for the
contract with the gateway.

The app's state is typed (:data:`RUNTIME`); the engine is started and stopped, and the registry
announcer opened and closed, in ``cleanup_ctx``. Every error becomes OpenAI's error JSON in
``unbroken.http.error_middleware`` (or an SSE error event once a stream has begun).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import orjson
from aiohttp import web

from replica.announce import RegistryAnnouncer, ReplicaAnnouncement
from replica.config import ReplicaConfig
from replica.detokenizer import DetokenizedPiece, IncrementalDetokenizer
from replica.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from replica.metrics import ReplicaMetrics
from replica.openai_api import (
    OpenAIRequest,
    build_generation_request,
    chat_chunk,
    chat_completion_response,
    completion_chunk,
    completion_response,
    finish_reason_str,
    models_response,
    parse_chat_request,
    parse_completion_request,
    resolve_adapter,
    usage_chunk,
    usage_dict,
)
from replica.protocol import FinishReason, GenerationRequest, ReplicaStateReport, TokenOutput
from unbroken.contract import headers as hdr
from unbroken.errors import (
    AuthenticationError,
    DrainingError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    UnbrokenError,
)
from unbroken.access import OPEN_PATHS, bearer_matches
from unbroken.http import error_middleware, json_response, read_json_body, sse_error_event

log = logging.getLogger(__name__)

SESSION_HEADER = hdr.SESSION_ID
SESSION_HISTORY_HEADER = hdr.SESSION_HISTORY
REQUEST_ID_HEADER = hdr.REQUEST_ID
REPLICA_ID_HEADER = hdr.REPLICA_ID
# KV snapshots are far larger than request bodies; they get their own limit.
MAX_KV_BODY_BYTES = 1 << 30


class ReplicaStatus(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"


@dataclass
class ReplicaRuntime:
    """Everything the handlers share: the engine, config, metrics, status and in-flight count.
    Only the event loop touches it."""

    config: ReplicaConfig
    engine: Any  # replica.engine.AsyncEngine, or a stand-in with the same interface in tests
    replica_id: str
    metrics: ReplicaMetrics
    advertise_url: str = ""
    status: ReplicaStatus = ReplicaStatus.LOADING
    started_at_s: float = field(default_factory=time.time)
    num_active: int = 0
    vocab_size: int | None = None
    announcer: RegistryAnnouncer | None = None
    engine_started: bool = False
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start_engine(self) -> None:
        """The model is loaded: start the engine thread, announce, and take requests."""
        await self.engine.start()
        self.engine_started = True
        self.vocab_size = len(self.engine.tokenizer)
        if self.status is ReplicaStatus.LOADING:
            self.status = ReplicaStatus.READY
        reg = self.config.registry
        if reg.redis_url and self.status is ReplicaStatus.READY:
            self.announcer = RegistryAnnouncer(
                reg.redis_url,
                ReplicaAnnouncement(
                    replica_id=self.replica_id,
                    url=self.advertise_url,
                    model=self.engine.served_name,
                    adapters=list(self.engine.adapter_names),
                    started_at_s=self.started_at_s,
                ),
                ttl_s=reg.ttl_s, key_prefix=reg.key_prefix,
            )
            self.announcer.start()

    async def drain(self, timeout_s: float) -> bool:
        """Take no new work, leave the registry, and wait up to ``timeout_s`` for running
        requests to finish. True when they all did."""
        self.status = ReplicaStatus.DRAINING
        if self.announcer is not None:
            await self.announcer.stop()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            log.warning("drain: %d requests still running after %.1fs", self.num_active, timeout_s)
            return False

    async def close(self) -> None:
        if self.announcer is not None:
            await self.announcer.stop()
            self.announcer = None
        if self.engine_started:
            self.engine_started = False
            await self.engine.stop()

    # -- requests ----------------------------------------------------------------------------------
    def check_accepting(self) -> None:
        if self.status is ReplicaStatus.DRAINING:
            raise DrainingError("this replica is draining and takes no new requests; retry elsewhere",
                                retry_after_s=self.config.server.drain_retry_after_s)
        if self.status is ReplicaStatus.LOADING or not self.engine_started:
            raise OverloadedError("the model is still loading; retry shortly",
                                  retry_after_s=self.config.server.drain_retry_after_s)

    def begin(self) -> None:
        self.num_active += 1
        self._idle.clear()

    def end(self) -> None:
        self.num_active -= 1
        if self.num_active <= 0:
            self.num_active = 0
            self._idle.set()

    def state_report(self) -> ReplicaStateReport:
        cfg = self.config
        if not self.engine_started:
            return ReplicaStateReport(
                replica_id=self.replica_id, pid=os.getpid(), model=cfg.model.served_name,
                adapters=sorted(cfg.model.adapters), quantization=cfg.model.quantization,
                dtype=cfg.model.dtype, device=cfg.model.device, status=self.status.value,
                queue_length=0, num_running=0, num_waiting=0, kv_bytes_used=0, kv_bytes_free=0,
                kv_bytes_per_token=0, device_memory_free_bytes=0, tokens_per_s=0.0, num_sessions=0,
                max_model_len=cfg.model.max_model_len, started_at_s=self.started_at_s,
            )
        e = self.engine
        s = e.stats()
        return ReplicaStateReport(
            replica_id=self.replica_id, pid=os.getpid(), model=e.served_name,
            adapters=list(e.adapter_names), quantization=e.quantization, dtype=e.dtype,
            device=e.device, status=self.status.value, queue_length=s.num_running + s.num_waiting,
            num_running=s.num_running, num_waiting=s.num_waiting, kv_bytes_used=s.kv_bytes_used,
            kv_bytes_free=s.kv_bytes_free, kv_bytes_per_token=s.kv_bytes_per_token,
            device_memory_free_bytes=s.device_memory_free_bytes, tokens_per_s=s.tokens_per_s,
            num_sessions=len(s.sessions), max_model_len=e.max_model_len,
            started_at_s=self.started_at_s, num_preemptions=s.num_preemptions,
        )


RUNTIME = web.AppKey("runtime", ReplicaRuntime)


# -- middlewares ------------------------------------------------------------------------------------


def _route_label(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Count every answer by route and status (outermost, so it sees mapped errors)."""
    metrics = request.app[RUNTIME].metrics
    route = _route_label(request)
    t0 = time.monotonic()
    status = "500"
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    except asyncio.CancelledError:
        status = "499"  # the client went away before the answer
        raise
    except web.HTTPException as e:
        status = str(e.status)
        raise
    finally:
        metrics.requests.labels(route, status).inc()
        metrics.request_duration.labels(route).observe(time.monotonic() - t0)


@web.middleware
async def gate_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The shared token on every route but ``/health``; then, for ``/v1``, whether new work is
    taken, counting work in flight so a drain knows when it is done."""
    rt = request.app[RUNTIME]
    token = rt.config.server.shared_token
    if token and request.path not in OPEN_PATHS:
        if not bearer_matches(request.headers.get("Authorization", ""), token):
            raise AuthenticationError("missing or wrong 'Authorization: Bearer' token for this replica")
    if not request.path.startswith("/v1"):
        return await handler(request)
    rt.check_accepting()
    rt.begin()
    try:
        return await handler(request)
    finally:
        rt.end()


# -- generation -------------------------------------------------------------------------------------


@dataclass
class _Turn:
    """What one generation has produced so far (used for both stream and non-stream)."""

    kind: str
    response_id: str
    model: str
    created: int
    detok: IncrementalDetokenizer
    num_prompt_tokens: int
    num_resume_tokens: int
    num_new_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None

    def usage(self) -> dict[str, Any]:
        return usage_dict(self.num_prompt_tokens, self.num_resume_tokens + self.num_new_tokens,
                          self.num_cached_tokens)


def _merge(a: DetokenizedPiece, b: DetokenizedPiece) -> DetokenizedPiece:
    return DetokenizedPiece(a.text + b.text, a.token_ids + b.token_ids)


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class _Generation:
    """Drives one engine request: token outputs in, text pieces out, metrics on the way."""

    def __init__(self, rt: ReplicaRuntime, gen_request: GenerationRequest, turn: _Turn, arrival_s: float) -> None:
        self.rt = rt
        self.gen_request = gen_request
        self.turn = turn
        self.arrival_s = arrival_s

    def _observe(self, out: TokenOutput) -> None:
        m = self.rt.metrics
        now = time.monotonic()
        if out.token_id is not None:
            self.turn.num_new_tokens += 1
            m.generated_tokens.inc()
            if self.turn.first_token_s is None:
                self.turn.first_token_s = now
                m.time_to_first_token.observe(now - self.arrival_s)
            elif self.turn.last_token_s is not None:
                m.inter_token_latency.observe(now - self.turn.last_token_s)
            self.turn.last_token_s = now
        if out.num_cached_prompt_tokens:
            self.turn.num_cached_tokens = out.num_cached_prompt_tokens
            m.cached_prompt_tokens.inc(out.num_cached_prompt_tokens)

    async def pieces(self, stream: AsyncIterator[TokenOutput], first: TokenOutput) -> AsyncIterator[DetokenizedPiece]:
        """Text pieces until the end; sets ``turn.finish_reason`` before the last one. Raises
        :class:`InternalError` if the engine fails the request."""
        turn = self.turn
        out: TokenOutput | None = first
        while out is not None:
            self._observe(out)
            piece = turn.detok.add(out.token_id) if out.token_id is not None else DetokenizedPiece("")
            if turn.detok.stopped:
                turn.finish_reason = "stop"
                yield piece
                return
            if out.finish_reason is not None:
                if out.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                    if piece:
                        yield piece
                    raise InternalError(f"the generation failed: {out.error or out.finish_reason.value}")
                turn.finish_reason = finish_reason_str(out.finish_reason)
                yield _merge(piece, turn.detok.flush())
                return
            if piece:
                yield piece
            out = await anext(stream, None)  # type: ignore[call-overload]
        raise InternalError("the engine ended the request without a finish reason")


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def _serve(
    request: web.Request,
    req: OpenAIRequest,
    prompt_ids: list[int],
    adapter: str | None,
    session_id: str | None,
    transcript: list[dict[str, Any]] | None,
) -> web.StreamResponse:
    """Run one generation and answer it (stream or not)."""
    rt = request.app[RUNTIME]
    engine = rt.engine
    _check_stop(req.stop, rt.config)
    arrival_s = time.monotonic()
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    response_id = _new_id("chatcmpl" if req.kind == "chat" else "cmpl")
    gen_request = build_generation_request(
        req, prompt_ids, request_id=f"{response_id}", adapter=adapter,
        max_model_len=engine.max_model_len, session_id=session_id, arrival_s=arrival_s)
    rt.metrics.prompt_tokens.inc(len(prompt_ids))
    headers = {REPLICA_ID_HEADER: rt.replica_id, REQUEST_ID_HEADER: request_id}
    turn = _Turn(kind=req.kind, response_id=response_id, model=req.model, created=int(time.time()),
                 detok=IncrementalDetokenizer(engine.tokenizer, req.stop),
                 num_prompt_tokens=len(prompt_ids), num_resume_tokens=len(req.resume_token_ids))
    generation = _Generation(rt, gen_request, turn, arrival_s)

    if len(req.resume_token_ids) >= gen_request.sampling.max_tokens:
        # Every token was already delivered; only the end of the stream was lost.
        turn.finish_reason = "length"
        pieces: AsyncIterator[DetokenizedPiece] = _one_piece(DetokenizedPiece(""))
        stream = None
    else:
        stream = engine.generate(gen_request)
        try:
            first = await anext(stream)  # client errors (context, adapter) surface here, before any byte
        except BaseException:
            await stream.aclose()
            raise
        if first.token_id is None and first.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
            await stream.aclose()
            raise InternalError(f"the generation failed: {first.error or first.finish_reason.value}")
        pieces = generation.pieces(stream, first)
    try:
        if req.stream:
            return await _answer_stream(request, rt, req, turn, pieces, headers, session_id, transcript)
        return await _answer_whole(rt, req, turn, pieces, headers, session_id, transcript)
    finally:
        if stream is not None:
            await stream.aclose()  # aborts the engine request if it is still running (frees its KV)


def _check_stop(stop: tuple[str, ...], config: ReplicaConfig) -> None:
    """Stop strings are held back as text is generated: their count and length bound that work."""
    server = config.server
    if len(stop) > server.max_stop_strings:
        raise InvalidRequestError(f"'stop' may hold at most {server.max_stop_strings} strings, got {len(stop)}",
                                  param="stop")
    longest = max((len(s) for s in stop), default=0)
    if longest > server.max_stop_string_chars:
        raise InvalidRequestError(f"a stop string may be at most {server.max_stop_string_chars} characters "
                                  f"long, got one of {longest}", param="stop")


async def _one_piece(piece: DetokenizedPiece) -> AsyncIterator[DetokenizedPiece]:
    yield piece


def _full_text(rt: ReplicaRuntime, req: OpenAIRequest, turn: _Turn) -> str:
    if not req.resume_token_ids:
        return turn.detok.text
    resumed = rt.engine.tokenizer.decode(req.resume_token_ids, skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)
    return resumed + turn.detok.text


def _finish_turn(rt: ReplicaRuntime, req: OpenAIRequest, turn: _Turn, session_id: str | None,
                 transcript: list[dict[str, Any]] | None) -> None:
    rt.metrics.finished.labels(turn.finish_reason or "unknown").inc()
    if session_id is None or transcript is None:
        return
    rt.engine.finish_turn(session_id, transcript + [{"role": "assistant", "content": _full_text(rt, req, turn)}])


async def _answer_whole(rt: ReplicaRuntime, req: OpenAIRequest, turn: _Turn,
                        pieces: AsyncIterator[DetokenizedPiece], headers: dict[str, str],
                        session_id: str | None, transcript: list[dict[str, Any]] | None) -> web.Response:
    ids: list[int] = []
    text: list[str] = []
    async for piece in pieces:
        ids.extend(piece.token_ids)
        text.append(piece.text)
    _finish_turn(rt, req, turn, session_id, transcript)
    build = chat_completion_response if req.kind == "chat" else completion_response
    body = build(response_id=turn.response_id, model=turn.model, created=turn.created, text="".join(text),
                 token_ids=ids, finish_reason=turn.finish_reason, usage=turn.usage())
    return json_response(body, headers=headers)


async def _answer_stream(request: web.Request, rt: ReplicaRuntime, req: OpenAIRequest, turn: _Turn,
                         pieces: AsyncIterator[DetokenizedPiece], headers: dict[str, str],
                         session_id: str | None, transcript: list[dict[str, Any]] | None) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={
        **headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})
    common = {"response_id": turn.response_id, "model": turn.model, "created": turn.created,
              "include_usage": req.include_usage}

    def chunk(piece: DetokenizedPiece, finish_reason: str | None = None) -> bytes:
        if req.kind == "chat":
            delta = {"content": piece.text} if piece.text or finish_reason is None else {}
            return _sse(chat_chunk(delta=delta, token_ids=piece.token_ids, finish_reason=finish_reason, **common))
        return _sse(completion_chunk(text=piece.text, token_ids=piece.token_ids, finish_reason=finish_reason,
                                     **common))

    try:
        await resp.prepare(request)
        if req.kind == "chat":
            await resp.write(_sse(chat_chunk(delta={"role": "assistant", "content": ""}, token_ids=[], **common)))
        try:
            async for piece in pieces:
                if turn.finish_reason is not None:
                    await resp.write(chunk(piece, turn.finish_reason))
                elif piece:
                    await resp.write(chunk(piece))
        except UnbrokenError as e:
            # After the first byte the status is sent: the error travels as an SSE event, and no
            # [DONE] follows, so a relay sees the stream as broken.
            log.warning("stream %s failed: %s", turn.response_id, e.message)
            await resp.write(sse_error_event(e))
            return resp
        _finish_turn(rt, req, turn, session_id, transcript)
        if req.include_usage:
            await resp.write(_sse(usage_chunk(kind=req.kind, response_id=turn.response_id, model=turn.model,
                                              created=turn.created, usage=turn.usage())))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (ConnectionResetError, ConnectionError):
        rt.metrics.client_disconnects.inc()
        log.info("client left stream %s after %d tokens", turn.response_id, turn.num_new_tokens)
    except asyncio.CancelledError:
        rt.metrics.client_disconnects.inc()
        raise
    return resp


# -- handlers ---------------------------------------------------------------------------------------


def _session_id(request: web.Request) -> str | None:
    return hdr.session_id(request.headers)


async def handle_chat(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    engine = rt.engine
    body = await read_json_body(request, rt.config.server.max_body_bytes)
    server_history = hdr.server_keeps_history(request.headers)
    req = parse_chat_request(body, rt.vocab_size, allow_empty_messages=server_history)
    adapter = resolve_adapter(req.model, engine.served_name, engine.adapter_names)
    session_id = _session_id(request)
    messages = req.messages
    if server_history:
        if session_id is None:
            raise InvalidRequestError(f"'{SESSION_HISTORY_HEADER}: server' needs an '{SESSION_HEADER}' header",
                                      param=SESSION_HEADER)
        history = await engine.session_transcript(session_id, adapter)
        messages = list(history or []) + messages
        if not messages:
            raise InvalidRequestError(f"session {session_id!r} has no kept conversation and the request "
                                      "brings no message", param="messages")
    size = sum(len(m["content"]) for m in messages)
    prompt_ids = await _off_loop_if_large(size, _chat_prompt_ids, engine.tokenizer, messages)
    return await _serve(request, req, prompt_ids, adapter, session_id, messages)


# Templating and tokenizing a prompt this long (characters) runs on a worker thread, so that one
# huge request does not stall every stream on the event loop.
LARGE_PROMPT_CHARS = 32 * 1024


async def _off_loop_if_large(size: int, fn: Any, *args: Any) -> Any:
    if size < LARGE_PROMPT_CHARS:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """The chat template's prompt, with every message's content tokenized as plain text: a
    control token's text inside content (``<|im_start|>system``) is not that control token, so
    a user cannot forge another role. Content without such text is tokenized as it always was."""
    markers = _control_token_texts(tokenizer)
    if not any(m in str(msg.get("content") or "") for msg in messages for m in markers):
        text = _render(tokenizer, messages)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    # Render with each content replaced by a marker of its own, then tokenize the template's text
    # between them as usual and each content with its special tokens split into plain text.
    nonce = secrets.token_hex(8)
    sentinels = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    text = _render(tokenizer, [{**m, "content": sentinels[i]} for i, m in enumerate(messages)])
    ids: list[int] = []
    pos = 0
    for sentinel, message in zip(sentinels, messages):
        at = text.find(sentinel, pos)
        if at < 0 or text.find(sentinel, at + 1) >= 0:
            raise InvalidRequestError("a message holds the text of a control token, and this model's chat template "
                                      "cannot keep it as plain text", param="messages")
        if at > pos:
            ids += tokenizer(text[pos:at], add_special_tokens=False)["input_ids"]
        content = str(message.get("content") or "")
        if content:
            ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        pos = at + len(sentinel)
    if pos < len(text):
        ids += tokenizer(text[pos:], add_special_tokens=False)["input_ids"]
    return ids


def _render(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template may reject a conversation's shape
        raise InvalidRequestError(f"the chat template rejected these messages: {e}", param="messages") from None


def _control_token_texts(tokenizer: Any) -> tuple[str, ...]:
    """The texts the tokenizer turns into special (control) tokens."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            texts.add(str(token))
    return tuple(t for t in texts if t)


def _text_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


async def handle_completions(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    engine = rt.engine
    body = await read_json_body(request, rt.config.server.max_body_bytes)
    req = parse_completion_request(body, rt.vocab_size)
    adapter = resolve_adapter(req.model, engine.served_name, engine.adapter_names)
    session_id = _session_id(request)
    transcript: list[dict[str, Any]] | None = None
    if req.prompt_token_ids is not None:
        prompt_ids = req.prompt_token_ids
        if session_id is not None:
            transcript = [{"role": "user", "content": engine.tokenizer.decode(
                prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)}]
    else:
        assert req.prompt_text is not None
        prompt_ids = await _off_loop_if_large(len(req.prompt_text), _text_prompt_ids, engine.tokenizer,
                                              req.prompt_text)
        transcript = [{"role": "user", "content": req.prompt_text}]
    return await _serve(request, req, prompt_ids, adapter, session_id, transcript)


async def handle_models(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    return json_response(models_response(rt.engine.served_name, list(rt.engine.adapter_names),
                                         created=int(rt.started_at_s)))


async def handle_health(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.status is ReplicaStatus.READY and rt.engine_started:
        return json_response({"status": "ok"})
    headers = {"Retry-After": str(max(1, int(rt.config.server.drain_retry_after_s)))}
    return json_response({"status": rt.status.value}, status=503, headers=headers)


async def handle_state(request: web.Request) -> web.Response:
    return json_response(request.app[RUNTIME].state_report().to_dict())


async def handle_metrics(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics.render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def handle_kv_export(request: web.Request) -> web.Response:
    from kvsync.protocol import CONTENT_TYPE_SNAPSHOT, encode_snapshot

    rt = request.app[RUNTIME]
    session_id = request.match_info["session_id"]
    snapshot = await rt.engine.export_session(session_id)
    if snapshot is None:
        raise NotFoundError(f"this replica holds no KV for session {session_id!r}", param="session_id")
    data = await asyncio.get_running_loop().run_in_executor(None, encode_snapshot, snapshot)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_SNAPSHOT,
                                            REPLICA_ID_HEADER: rt.replica_id})


async def handle_kv_import(request: web.Request) -> web.Response:
    from kvsync.protocol import decode_snapshot

    rt = request.app[RUNTIME]
    session_id = request.match_info["session_id"]
    if request.content_length is not None and request.content_length > MAX_KV_BODY_BYTES:
        raise PayloadTooLargeError(f"KV snapshot of {request.content_length} bytes exceeds {MAX_KV_BODY_BYTES}")
    # The whole body, in chunks as it arrives (one read() returns only what is buffered).
    data = bytearray()
    async for chunk in request.content.iter_chunked(1 << 20):
        if len(data) + len(chunk) > MAX_KV_BODY_BYTES:
            raise PayloadTooLargeError(f"KV snapshot exceeds {MAX_KV_BODY_BYTES} bytes")
        data += chunk
    try:
        snapshot = await asyncio.get_running_loop().run_in_executor(None, decode_snapshot, data)
    except ValueError as e:
        raise InvalidRequestError(f"the body is not a valid KV snapshot: {e}", param="body") from None
    snapshot.session_id = session_id
    num_tokens = await rt.engine.import_session(snapshot)
    return json_response({"session_id": session_id, "num_tokens": num_tokens},
                         headers={REPLICA_ID_HEADER: rt.replica_id})


# -- the app ----------------------------------------------------------------------------------------


def create_app(
    config: ReplicaConfig,
    engine: Any,
    *,
    replica_id: str | None = None,
    advertise_url: str | None = None,
    engine_loaded: bool = True,
) -> web.Application:
    """The replica's aiohttp app over ``engine``.

    With ``engine_loaded`` the engine starts with the app and the replica is ready at once; without
    it the replica answers 503 (``/health`` says ``loading``) until :meth:`ReplicaRuntime.start_engine`
    is awaited after ``engine.load()`` (what ``python -m replica`` does, so that ``/health`` and
    ``/state`` answer while the model loads).
    """
    server = config.server
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
    default_url = f"http://{host}:{server.port}"
    rt = ReplicaRuntime(
        config=config,
        engine=engine,
        replica_id=replica_id or server.replica_id or f"{host}:{server.port}",
        # Read at scrape time, once the engine runs (rt is bound by then).
        metrics=ReplicaMetrics(stats_fn=lambda: rt.engine.stats() if rt.engine_started else None),
        advertise_url=advertise_url or config.registry.advertise_url or default_url,
    )
    app = web.Application(middlewares=[metrics_middleware, error_middleware, gate_middleware],
                          client_max_size=server.max_body_bytes)
    app[RUNTIME] = rt

    async def engine_ctx(_: web.Application) -> AsyncIterator[None]:
        if engine_loaded:
            await rt.start_engine()
        yield
        await rt.close()

    app.cleanup_ctx.append(engine_ctx)
    app.router.add_post("/v1/chat/completions", handle_chat)
    app.router.add_post("/v1/completions", handle_completions)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/v1/sessions/{session_id}/kv", handle_kv_export)
    app.router.add_put("/v1/sessions/{session_id}/kv", handle_kv_import)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/state", handle_state)
    app.router.add_get("/metrics", handle_metrics)
    return app


__all__ = ["RUNTIME", "ReplicaRuntime", "ReplicaStatus", "create_app"]
