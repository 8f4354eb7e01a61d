"""A client side that survives the loss of a gateway: an ``httpx2`` client for the official ``openai`` SDK.

    from openai import OpenAI
    import unbroken.client

    client = OpenAI(base_url="http://gw-a:8000/v1", api_key=KEY,
                    http_client=unbroken.client.http_client(urls=["http://gw-a:8000/v1", "http://gw-b:8000/v1"]))

What it does, under the SDK (which sees one response and one stream):
- Every ``POST`` gets an ``X-Request-ID`` (the caller's, or a random one) that stays the same across
  every try of that request.
- A connection refused (or reset before an answer) goes to the next gateway of ``urls``, round the
  list, until ``max_reconnects`` or ``reconnect_timeout_s`` run out.
- A stream (``text/event-stream``) is passed on event by event, only whole events, remembering the
  ``id:`` of the last one. If it breaks (connection lost, or ended without ``data: [DONE]``), the same
  body is POSTed again, with ``Last-Event-ID: <that id>`` and the same ``X-Request-ID``, to the same
  gateway and then the next ones; the gateway continues from exactly that event, and the new
  response's events are spliced in. A refused resume (4xx: unknown or expired stream) becomes an
  SSE error event, which the SDK raises as ``openai.APIError``.
- A non-stream request whose connection breaks is sent again with the same ``X-Request-ID``: the
  gateway returns the answer it already made (or waits for it) instead of generating twice.

It needs only ``httpx2`` (``httpx`` for an older SDK; the ``openai`` SDK brings either); it never
imports torch. The protocol, for a client in another language, is in docs/protocol.md ("Resuming a stream").
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Sequence

try:  # the openai SDK's HTTP client: httpx2 in its current releases, httpx in older ones (same API)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - an older openai SDK
    import httpx  # type: ignore[no-redef]

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
LAST_EVENT_ID_HEADER = "Last-Event-ID"
DONE_DATA = b"[DONE]"
# Connection failures that mean "this gateway is gone or the connection broke": try again elsewhere.
_RETRYABLE = (httpx.TransportError,)


@dataclass(frozen=True)
class ReconnectPolicy:
    """How hard the client tries before it gives up."""

    max_reconnects: int = 8
    """Reconnections per request (each try of each gateway counts one)."""
    reconnect_timeout_s: float = 30.0
    """Longest time spent reconnecting one request, from its first failure."""
    backoff_s: float = 0.05
    """Pause after a whole round of the gateway list failed (doubles up to 1 s)."""


class _Gateways:
    """The base URLs, and which one a request goes to next."""

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("unbroken.client needs at least one gateway URL")
        self.urls = [httpx.URL(u.rstrip("/")) for u in urls]
        self.current = 0

    def rebase(self, url: httpx.URL, index: int) -> httpx.URL:
        """``url`` (made by the SDK against one of the base URLs, or any other) sent to gateway ``index``:
        the scheme/host/port (and base path) swapped, the rest kept."""
        target = self.urls[index]
        path = url.raw_path.decode()
        for base in self.urls:
            base_path = base.raw_path.decode().rstrip("/")
            if url.host == base.host and url.port == base.port and path.startswith(base_path + "/"):
                path = target.raw_path.decode().rstrip("/") + path[len(base_path):]
                break
        return url.copy_with(scheme=target.scheme, host=target.host, port=target.port, raw_path=path.encode())

    def order(self) -> list[int]:
        """The current gateway first, then the others in turn."""
        n = len(self.urls)
        return [(self.current + i) % n for i in range(n)]


class SSESplicer:
    """Whole SSE events out of a byte stream, with the ``id`` of the last one passed on.

    Bytes of an event are held until its blank line arrives, so a cut never passes on half an
    event; the id of every whole event passed on is remembered for ``Last-Event-ID``."""

    def __init__(self) -> None:
        self._buf = b""
        self.last_event_id: str | None = None
        self.done = False  # ``data: [DONE]`` was passed on
        self.num_events = 0

    def feed(self, data: bytes) -> bytes:
        """The whole events in ``data`` (plus what was held), as bytes to pass on."""
        buf = self._buf + data if self._buf else data
        if b"\n\n" not in buf:
            buf = buf.replace(b"\r\n", b"\n")
            if b"\n\n" not in buf:
                self._buf = buf
                return b""
        buf = buf.replace(b"\r\n", b"\n")
        end = buf.rfind(b"\n\n") + 2
        whole, self._buf = buf[:end], buf[end:]
        for block in whole.split(b"\n\n"):
            if block:
                self.num_events += 1
            for line in block.split(b"\n"):
                if line.startswith(b"id:"):
                    self.last_event_id = line[3:].strip().decode("utf-8", "replace")
                elif line.startswith(b"data:") and line[5:].strip() == DONE_DATA:
                    self.done = True
        return whole

    def reset_partial(self, exc: BaseException) -> None:
        """The connection broke: the held half event is dropped (it will be sent again). Raises
        ``exc`` when events without an ``id`` were passed on: a gateway that cannot resume."""
        self._buf = b""
        if self.num_events and self.last_event_id is None:
            raise exc


def _error_event(status: int, body: bytes) -> bytes:
    """A refused resume as the SSE error event the SDK raises (``openai.APIError``)."""
    import json

    try:
        obj = json.loads(body)
        if not isinstance(obj, dict) or "error" not in obj:
            raise ValueError
    except ValueError:
        obj = {"error": {"message": f"the gateway refused to resume the stream ({status})",
                         "type": "invalid_request_error", "param": None, "code": "stream_not_resumable"}}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _prepare(request: httpx.Request) -> None:
    if request.method == "POST" and REQUEST_ID_HEADER not in request.headers:
        request.headers[REQUEST_ID_HEADER] = os.urandom(12).hex()


def _retry_request(request: httpx.Request, url: httpx.URL, last_event_id: str | None) -> httpx.Request:
    headers = httpx.Headers(request.headers)
    headers.pop("Host", None)
    if last_event_id is not None:
        headers[LAST_EVENT_ID_HEADER] = last_event_id
    return httpx.Request(request.method, url, headers=headers, content=request.content,
                         extensions=request.extensions)


def _is_stream(response: httpx.Response) -> bool:
    return response.status_code == 200 and \
        response.headers.get("content-type", "").startswith("text/event-stream")


class _Attempts:
    """The bookkeeping of one request's reconnections (bounded in number and time)."""

    def __init__(self, gateways: _Gateways, policy: ReconnectPolicy) -> None:
        self.gateways = gateways
        self.policy = policy
        self.num_reconnects = 0
        self.first_failure_s: float | None = None
        self.rounds = 0

    def plan(self) -> list[int]:
        return self.gateways.order()

    def failed(self, index: int, exc: BaseException) -> None:
        now = time.monotonic()
        if self.first_failure_s is None:
            self.first_failure_s = now
        self.num_reconnects += 1
        log.info("unbroken.client: %s failed (%s); trying again", self.gateways.urls[index], exc)
        if self.num_reconnects > self.policy.max_reconnects or \
                now - self.first_failure_s > self.policy.reconnect_timeout_s:
            raise exc
        if index == self.gateways.current:  # move on from a gateway that failed
            self.gateways.current = (index + 1) % len(self.gateways.urls)

    def round_pause_s(self) -> float:
        self.rounds += 1
        return min(1.0, self.policy.backoff_s * (2 ** (self.rounds - 1)))


class ResumingTransport(httpx.BaseTransport):
    """An ``httpx`` transport that reconnects and resumes across gateways (see the module text)."""

    def __init__(self, urls: Sequence[str], policy: ReconnectPolicy | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.gateways = _Gateways(urls)
        self.policy = policy or ReconnectPolicy()
        self._inner = transport or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        _prepare(request)
        request.read()
        attempts = _Attempts(self.gateways, self.policy)
        index, resp = self._open(request, attempts, None)
        if request.method == "POST" and _is_stream(resp):
            resp.stream = _SyncSplicedStream(self, request, attempts, index, resp.stream)  # type: ignore[arg-type]
        return resp

    def _open(self, request: httpx.Request, attempts: _Attempts,
              last_event_id: str | None) -> tuple[int, httpx.Response]:
        """The first gateway that answers (any status), in the order of ``attempts``."""
        while True:
            for index in attempts.plan():
                req = _retry_request(request, self.gateways.rebase(request.url, index), last_event_id)
                try:
                    return index, self._inner.handle_request(req)
                except _RETRYABLE as e:
                    attempts.failed(index, e)
            time.sleep(attempts.round_pause_s())

    def close(self) -> None:
        self._inner.close()


class _SyncSplicedStream(httpx.SyncByteStream):
    def __init__(self, transport: ResumingTransport, request: httpx.Request, attempts: _Attempts, index: int,
                 raw: httpx.SyncByteStream) -> None:
        self.transport = transport
        self.request = request
        self.attempts = attempts
        self.index = index
        self.raw = raw
        self.splicer = SSESplicer()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                for data in self.raw:
                    out = self.splicer.feed(data)
                    if out:
                        yield out
                if self.splicer.done:
                    return
                exc: BaseException = httpx.RemoteProtocolError("the stream ended without [DONE]")
            except _RETRYABLE as e:
                exc = e
            finally:
                self.raw.close()
            self.splicer.reset_partial(exc)
            self.attempts.failed(self.index, exc)
            self.index, resp = self.transport._open(self.request, self.attempts, self.splicer.last_event_id)
            if not _is_stream(resp):
                body = resp.read()
                resp.close()
                yield _error_event(resp.status_code, body)
                return
            self.raw = resp.stream  # type: ignore[assignment]  # spliced: this splicer's state goes on

    def close(self) -> None:
        self.raw.close()


class AsyncResumingTransport(httpx.AsyncBaseTransport):
    """The ``httpx.AsyncClient`` form of :class:`ResumingTransport` (for ``openai.AsyncOpenAI``)."""

    def __init__(self, urls: Sequence[str], policy: ReconnectPolicy | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.gateways = _Gateways(urls)
        self.policy = policy or ReconnectPolicy()
        self._inner = transport or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        _prepare(request)
        await request.aread()
        attempts = _Attempts(self.gateways, self.policy)
        index, resp = await self._open(request, attempts, None)
        if request.method == "POST" and _is_stream(resp):
            resp.stream = _AsyncSplicedStream(self, request, attempts, index, resp.stream)  # type: ignore[arg-type]
        return resp

    async def _open(self, request: httpx.Request, attempts: _Attempts,
                    last_event_id: str | None) -> tuple[int, httpx.Response]:
        import asyncio

        while True:
            for index in attempts.plan():
                req = _retry_request(request, self.gateways.rebase(request.url, index), last_event_id)
                try:
                    return index, await self._inner.handle_async_request(req)
                except _RETRYABLE as e:
                    attempts.failed(index, e)
            await asyncio.sleep(attempts.round_pause_s())

    async def aclose(self) -> None:
        await self._inner.aclose()


class _AsyncSplicedStream(httpx.AsyncByteStream):
    def __init__(self, transport: AsyncResumingTransport, request: httpx.Request, attempts: _Attempts, index: int,
                 raw: httpx.AsyncByteStream) -> None:
        self.transport = transport
        self.request = request
        self.attempts = attempts
        self.index = index
        self.raw = raw
        self.splicer = SSESplicer()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async for data in self.raw:
                    out = self.splicer.feed(data)
                    if out:
                        yield out
                if self.splicer.done:
                    return
                exc: BaseException = httpx.RemoteProtocolError("the stream ended without [DONE]")
            except _RETRYABLE as e:
                exc = e
            finally:
                await self.raw.aclose()
            self.splicer.reset_partial(exc)
            self.attempts.failed(self.index, exc)
            self.index, resp = await self.transport._open(self.request, self.attempts,
                                                          self.splicer.last_event_id)
            if not _is_stream(resp):
                body = await resp.aread()
                await resp.aclose()
                yield _error_event(resp.status_code, body)
                return
            self.raw = resp.stream  # type: ignore[assignment]

    async def aclose(self) -> None:
        await self.raw.aclose()


def http_client(urls: Sequence[str], *, policy: ReconnectPolicy | None = None, timeout_s: float = 600.0,
                **kwargs: object) -> httpx.Client:
    """An ``httpx.Client`` for ``openai.OpenAI(http_client=...)`` that reconnects and resumes across ``urls``."""
    return httpx.Client(transport=ResumingTransport(urls, policy), timeout=httpx.Timeout(timeout_s, connect=2.0),
                        **kwargs)  # type: ignore[arg-type]


def async_http_client(urls: Sequence[str], *, policy: ReconnectPolicy | None = None, timeout_s: float = 600.0,
                      **kwargs: object) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for ``openai.AsyncOpenAI(http_client=...)``."""
    return httpx.AsyncClient(transport=AsyncResumingTransport(urls, policy),
                             timeout=httpx.Timeout(timeout_s, connect=2.0), **kwargs)  # type: ignore[arg-type]
