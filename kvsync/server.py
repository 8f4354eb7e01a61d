"""The sidecar's HTTP face (aiohttp, loopback): the replica posts snapshots and asks for restores.

Routes:

- ``POST /v1/sessions/{id}/snapshots``: body = a snapshot in wire form. 202 accepted, 409
  need_full, 503 busy, 400 invalid; JSON :class:`~kvsync.protocol.PublishReply`. Answers as soon
  as the snapshot is cut into blocks; Redis is written later by the writer task.
- ``POST /v1/sessions/{id}/fetch``: body = :class:`~kvsync.protocol.FetchRequest`. 200 with the
  full snapshot in wire form and ``X-KVSync-Outcome: restored``; or, when the request asked for
  ``handoff: shm`` and ``server.handoff_dir`` is usable, 200 with a
  :class:`~kvsync.protocol.FetchReply` (JSON, ``restored``) naming the shared-memory file that holds
  it; or 200 with a :class:`~kvsync.protocol.FetchReply` saying why there is none.
- ``DELETE /v1/sessions/{id}``: forget a session in Redis.
- ``GET /health`` (200 while serving, whether or not Redis is up), ``GET /v1/state``, ``GET /metrics``.

With ``auth.token`` set, every route but ``/health`` needs ``Authorization: Bearer <token>`` (401
otherwise).
"""

from __future__ import annotations

import logging
import os
from typing import Any, AsyncIterator

from aiohttp import web

from kvsync.config import KVSyncConfig
from kvsync.handoff import sweep, usable_dir
from kvsync.metrics import KVSyncMetrics
from kvsync.protocol import (
    CONTENT_TYPE_SNAPSHOT,
    OUTCOME_HEADER,
    FetchReply,
    FetchRequest,
    PublishReply,
)
from kvsync.restore import restore_session
from kvsync.store import KVStore
from kvsync.writer import REDIS_FAILURES, ReplicationWriter
from unbroken.access import OPEN_PATHS, bearer_matches
from unbroken.credentials import redact_url
from unbroken.errors import AuthenticationError, InvalidRequestError, OverloadedError, PayloadTooLargeError
from unbroken.http import error_middleware, json_response

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", KVSyncConfig)
METRICS = web.AppKey("metrics", KVSyncMetrics)
STORE = web.AppKey("store", KVStore)
WRITER = web.AppKey("writer", ReplicationWriter)
HANDOFF_DIR = web.AppKey("handoff_dir", str)

CHUNK_BYTES = 4 * 1024 * 1024
MAX_FETCH_REQUEST_BYTES = 64 * 1024
_PUBLISH_STATUS = {"accepted": 202, "need_full": 409, "busy": 503, "too_large": 413, "invalid": 400}


@web.middleware
async def token_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """``auth.token`` on every route but ``/health``."""
    token = request.app[CONFIG].auth.token
    if token and request.path not in OPEN_PATHS:
        if not bearer_matches(request.headers.get("Authorization", ""), token):
            raise AuthenticationError("missing or wrong 'Authorization: Bearer' token for this sidecar")
    return await handler(request)


def create_app(config: KVSyncConfig) -> web.Application:
    app = web.Application(middlewares=[error_middleware, token_middleware],
                          client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[METRICS] = KVSyncMetrics()
    app[HANDOFF_DIR] = usable_dir(config.server.handoff_dir) or ""
    if app[HANDOFF_DIR]:
        sweep(app[HANDOFF_DIR])
    app.cleanup_ctx.append(_resources)
    app.router.add_post("/v1/sessions/{session_id}/snapshots", publish)
    app.router.add_post("/v1/sessions/{session_id}/fetch", fetch)
    app.router.add_delete("/v1/sessions/{session_id}", delete)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/state", state)
    app.router.add_get("/metrics", metrics)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = KVStore(config.redis, config.store, config.auth.mac_secret)
    writer = ReplicationWriter(store, config, app[METRICS])
    app[STORE] = store
    app[WRITER] = writer
    writer.start()
    try:
        if not await store.ping():
            raise ConnectionError("PING failed")
    except REDIS_FAILURES as e:
        log.warning("kvsync: Redis at %s is not reachable yet (%s); serving, replication waits for it",
                    redact_url(config.redis.url), e)
    yield
    await writer.stop()
    await store.close()
    if app[HANDOFF_DIR]:
        sweep(app[HANDOFF_DIR], older_than_s=-1.0, owner_pid=os.getpid())


async def publish(request: web.Request) -> web.Response:
    try:
        body = await _read_body(request, request.app[CONFIG].server.max_body_bytes)
    except PayloadTooLargeError:
        request.app[METRICS].snapshots_refused.labels("too_large").inc()
        raise
    reply = await request.app[WRITER].accept(request.match_info["session_id"], body)
    status = _PUBLISH_STATUS.get(reply.status, 400)
    headers = {"Retry-After": "1"} if reply.status == "busy" else None
    return json_response(reply.to_dict(), status=status, headers=headers)


async def fetch(request: web.Request) -> web.StreamResponse:
    session_id = request.match_info["session_id"]
    try:
        ask = FetchRequest.from_json(await _read_body(request, MAX_FETCH_REQUEST_BYTES))
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None
    config = request.app[CONFIG]
    handoff_dir = request.app[HANDOFF_DIR] if ask.handoff == "shm" else ""
    result = await restore_session(request.app[STORE], request.app[METRICS], session_id,
                                   ask.identity, config.writer.fetch_timeout_s, handoff_dir or None,
                                   max_tokens=ask.max_tokens)
    if result.outcome == "restored" and result.manifest is not None:
        request.app[WRITER].remember(result.manifest)
    if result.outcome == "restored" and result.handoff_path is not None:
        reply = FetchReply("restored", handoff_path=result.handoff_path, handoff_bytes=result.handoff_bytes)
        return json_response(reply.to_dict(), headers={OUTCOME_HEADER: "restored"})
    if result.outcome == "restored" and result.wire is not None:
        return await _send_chunked(request, result.wire)
    reply = FetchReply(result.outcome, result.message, result.transcript)
    return json_response(reply.to_dict(), headers={OUTCOME_HEADER: result.outcome})


async def _read_body(request: web.Request, limit: int) -> bytearray:
    """The body, read chunk by chunk up to ``limit`` bytes (413 past it). Nothing is sized from
    the peer's Content-Length: the buffer grows only as bytes arrive."""
    n = request.content_length
    if n is not None and n > limit:
        raise PayloadTooLargeError(f"a body of {n} bytes exceeds the limit of {limit}")
    buf = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK_BYTES):
        if len(buf) + len(chunk) > limit:
            raise PayloadTooLargeError(f"the body exceeds the limit of {limit} bytes")
        buf += chunk
    return buf


async def _send_chunked(request: web.Request, parts: list[bytes | memoryview]) -> web.StreamResponse:
    """Write the wire form's buffers as they are (never joined), a few MiB at a time."""
    resp = web.StreamResponse(headers={OUTCOME_HEADER: "restored", "Content-Type": CONTENT_TYPE_SNAPSHOT})
    resp.content_length = sum(len(p) for p in parts)
    await resp.prepare(request)
    for part in parts:
        view = memoryview(part).cast("B")
        for i in range(0, len(view), CHUNK_BYTES):
            await resp.write(view[i:i + CHUNK_BYTES])
    await resp.write_eof()
    return resp


async def delete(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    request.app[WRITER].forget(session_id)
    try:
        await request.app[STORE].delete_session(session_id)
    except REDIS_FAILURES as e:
        request.app[METRICS].redis_errors.labels("delete").inc()
        raise OverloadedError(f"Redis is unavailable: {e}", retry_after_s=1.0) from None
    return json_response(PublishReply("deleted").to_dict())


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "replication_paused": request.app[WRITER].paused})


async def state(request: web.Request) -> web.Response:
    return json_response({**request.app[WRITER].state(), "handoff_dir": request.app[HANDOFF_DIR]})


async def metrics(request: web.Request) -> web.Response:
    request.app[WRITER].update_gauges()
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
