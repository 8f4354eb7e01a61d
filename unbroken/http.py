"""HTTP edge helpers shared by the gateway and the replica.

The one place where :class:`~unbroken.errors.UnbrokenError` becomes OpenAI's error JSON
(:func:`error_response`) or an SSE error event (:func:`sse_error_event`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from unbroken.errors import (
    InternalError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnbrokenError,
)

log = logging.getLogger(__name__)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(err: UnbrokenError, headers: dict[str, str] | None = None) -> web.Response:
    """OpenAI's error JSON with the error's status (and ``Retry-After`` when it has one)."""
    hdrs = dict(headers or {})
    if err.retry_after_s is not None:
        hdrs["Retry-After"] = str(max(1, int(round(err.retry_after_s))))
    return json_response(err.to_dict(), status=err.status, headers=hdrs)


def sse_error_event(err: UnbrokenError) -> bytes:
    """An SSE ``data:`` event carrying OpenAI's error JSON, for errors after the stream began."""
    return b"data: " + orjson.dumps(err.to_dict()) + b"\n\n"


async def read_body(request: web.Request, max_body_bytes: int, timeout_s: float | None = None) -> bytes:
    """The whole body, up to ``max_body_bytes``: 413 above it (from Content-Length before reading, or
    as soon as more arrives), 408 when it does not arrive within ``timeout_s``."""
    if request.content_length is not None and request.content_length > max_body_bytes:
        raise PayloadTooLargeError(
            f"request body of {request.content_length} bytes exceeds the limit of {max_body_bytes}"
        )
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                chunk = await request.content.read(max_body_bytes + 1 - size)
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
                if size > max_body_bytes:
                    raise PayloadTooLargeError(f"request body exceeds the limit of {max_body_bytes} bytes")
    except TimeoutError:
        raise RequestTimeoutError(f"the request body did not arrive within {timeout_s} s") from None
    return b"".join(parts)


async def read_json_body(request: web.Request, max_body_bytes: int,
                         timeout_s: float | None = None) -> dict[str, Any]:
    """Read and parse a JSON object body, raising 413/408/400 errors a client can act on."""
    raw = await read_body(request, max_body_bytes, timeout_s)
    if not raw:
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return body


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every error raised by a handler to OpenAI's error JSON."""
    try:
        return await handler(request)
    except UnbrokenError as e:
        return error_response(e)
    except web.HTTPRequestEntityTooLarge as e:
        return error_response(PayloadTooLargeError(e.text or "request body too large"))
    except web.HTTPNotFound:
        return error_response(NotFoundError(f"no route for {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        err = NotFoundError(f"method {request.method} not allowed on {request.path}")
        err.status = 405
        return error_response(err)
    except web.HTTPException:
        raise
    except Exception:  # noqa: BLE001 - the edge: nothing may escape as a bare 500 page
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(InternalError("internal error"))
