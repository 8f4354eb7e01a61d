"""A write-only Redis connection for the stream state's hot path: ``SET key value PX ttl``, pipelined
on one socket, encoded here.

Every stream the gateway relays is written to Redis as it opens and while it grows. Through
redis-py a one-command pipeline costs the gateway about 280 µs of CPU on this project's reference
machine (a lone ``SET`` 190 µs: command packing, the connection pool, the pure-Python reply
parser). Here a batch is written from the caller's own call (:meth:`RedisSetWriter.send`: no task
is woken to send it) and the replies are counted by the connection's protocol as they arrive,
calling the batch's callback: no task waits on them either. Reads, pub/sub and everything else stay
on redis-py.

The URL is parsed by redis-py, so the same forms work: ``redis://``, ``rediss://`` (TLS, verified
unless ``ssl_cert_reqs=none``; ``ssl_ca_certs`` honoured), ``unix://``, a username and password
(``AUTH``), a database (``SELECT``). The replies are read back one line each and only ``+OK`` is
success: an error reply fails the batch after every reply was read (the socket stays in step);
anything else, a lost connection or a batch unanswered for too long closes the connection: every
batch waiting on it fails, and the next write opens a new one.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from unbroken.resp import setup_commands

log = logging.getLogger(__name__)

_MAX_REPLY_BYTES = 4096
MAX_BUFFERED_BYTES = 8 << 20  # unsent bytes on the socket beyond which a batch is refused, not queued

# Called once per batch: (None, []) all written; (None, errors) some refused; (exc, []) no answer.
BatchDone = Callable[[BaseException | None, list[str]], None]


def redis_client(url: str, op_timeout_s: float) -> Any:
    """The gateway's redis-py client (reads, pub/sub, everything but the stream state's writes). A
    command that meets a pooled connection Redis has closed (it restarted since) is sent once more,
    at once, on a fresh connection: without that, the first read after a Redis restart fails."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    return aioredis.from_url(url, socket_timeout=op_timeout_s, socket_connect_timeout=op_timeout_s,
                             retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])


class RedisWireError(Exception):
    """A write failed: the server's error reply, a protocol mismatch or a connection problem."""


def encode_set_px(key: bytes, value: bytes, ttl_ms: int) -> bytes:
    return b"*5\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$2\r\nPX\r\n$%d\r\n%d\r\n" % (
        len(key), key, len(value), value, len(b"%d" % ttl_ms), ttl_ms)


def encode_set_many(items: list[tuple[bytes, bytes, int]]) -> bytes:
    return b"".join([encode_set_px(k, v, ttl) for k, v, ttl in items])


class _Batch:
    __slots__ = ("left", "errors", "done", "sent_s")

    def __init__(self, left: int, done: BatchDone, sent_s: float) -> None:
        self.left = left
        self.errors: list[str] = []
        self.done = done
        self.sent_s = sent_s


class _Replies(asyncio.Protocol):
    """One connection's replies, handed to its writer as they arrive."""

    def __init__(self, owner: "RedisSetWriter") -> None:
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        self.owner._on_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._on_lost(self, exc)


class RedisSetWriter:
    """``SET ... PX`` in batches on one connection, opened by :meth:`connect` (and by
    :meth:`set_many`) and again after any failure. Replies come back in order: the first batch
    still waiting takes the next reply."""

    def __init__(self, url: str, connect_timeout_s: float) -> None:
        self._opts: dict[str, Any] = parse_url(url)
        self.connect_timeout_s = connect_timeout_s
        self._transport: asyncio.Transport | None = None
        self._protocol: _Replies | None = None
        self._pending: deque[_Batch] = deque()
        self._buf = bytearray()

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def oldest_unanswered_s(self) -> float | None:
        """When the oldest batch still waiting for its replies was sent (monotonic), or None."""
        return self._pending[0].sent_s if self._pending else None

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self._opts.get("ssl_ca_certs"))
        reqs = str(self._opts.get("ssl_cert_reqs", "required")).lower()
        if reqs == "none":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif reqs == "optional":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    async def connect(self) -> None:
        """Open the connection (AUTH and SELECT as the URL says) unless it is open; raises
        RedisWireError, OSError or TimeoutError."""
        if self.connected:
            return
        self.close()
        o = self._opts
        cls = o.get("connection_class")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if cls is UnixDomainSocketConnection:
                    transport, protocol = await loop.create_unix_connection(lambda: _Replies(self), o["path"])
                else:
                    tls = self._ssl_context() if cls is SSLConnection else None
                    transport, protocol = await loop.create_connection(
                        lambda: _Replies(self), o.get("host", "localhost"), o.get("port", 6379), ssl=tls)
                self._transport, self._protocol = transport, protocol  # type: ignore[assignment]
                self._buf.clear()
                hello = setup_commands(o.get("username"), o.get("password"), o.get("db"))
                if hello:
                    errors = await self._send_and_wait(b"".join(hello), len(hello))
                    if errors:
                        # the server's words, never the password: AUTH's reply does not repeat it
                        raise RedisWireError(f"Redis refused the connection's set-up: {errors[0]}")
        except BaseException:
            self.close()
            raise

    def send(self, items: list[tuple[bytes, bytes, int]], done: BatchDone) -> bool:
        """Write ``SET key value PX ttl_ms`` for each item now; ``done`` is called once its replies
        are in (or the connection failed). False, and ``done`` never called, when the connection
        is not open or Redis is not reading what it was sent."""
        t = self._transport
        if t is None or t.is_closing() or t.get_write_buffer_size() > MAX_BUFFERED_BYTES:
            return False
        self._write(encode_set_many(items), len(items), done)
        return True

    def _write(self, data: bytes, num_replies: int, done: BatchDone) -> None:
        assert self._transport is not None
        self._transport.write(data)
        self._pending.append(_Batch(num_replies, done, time.monotonic()))

    async def _send_and_wait(self, data: bytes, n: int) -> list[str]:
        fut: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()

        def done(exc: BaseException | None, errors: list[str]) -> None:
            if not fut.done():
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(errors)

        self._write(data, n, done)
        return await fut

    async def set_many(self, items: list[tuple[bytes, bytes, int]]) -> None:
        """``SET key value PX ttl_ms`` for each item, waiting for the replies; raises RedisWireError
        (or a timeout/OSError) when any failed. The caller bounds the time; a cancel closes the
        connection."""
        if not items:
            return
        await self.connect()
        try:
            errors = await self._send_and_wait(encode_set_many(items), len(items))
        except BaseException:
            self.close()
            raise
        if errors:
            raise RedisWireError(f"{len(errors)} of {len(items)} writes refused: {errors[0]}")

    # -- the protocol's side ---------------------------------------------------------------------

    def _on_data(self, protocol: _Replies, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        buf = self._buf
        buf += data
        start = 0
        while True:
            end = buf.find(b"\r\n", start)
            if end < 0:
                break
            line = buf[start:end]
            start = end + 2
            if not self._pending:
                self.abort(RedisWireError(f"unexpected Redis reply {bytes(line[:40])!r}"))
                return
            batch = self._pending[0]
            if line != b"+OK":
                if line[:1] != b"-":
                    self.abort(RedisWireError(f"unexpected Redis reply {bytes(line[:40])!r}"))
                    return
                batch.errors.append(bytes(line[1:200]).decode(errors="replace"))
            batch.left -= 1
            if batch.left == 0:
                self._pending.popleft()
                _call(batch.done, None, batch.errors)
                if protocol is not self._protocol:  # the callback closed the connection
                    return
        del buf[:start]
        if len(buf) > _MAX_REPLY_BYTES:
            self.abort(RedisWireError("Redis reply too long"))

    def _on_lost(self, protocol: _Replies, exc: Exception | None) -> None:
        if protocol is self._protocol:
            self.abort(exc if exc is not None else ConnectionResetError("Redis closed the connection"))

    def abort(self, exc: BaseException) -> None:
        """Drop the connection now: every batch waiting on it fails with ``exc``."""
        t, pending = self._transport, self._pending
        self._transport = self._protocol = None
        self._pending = deque()
        self._buf = bytearray()
        if t is not None:
            t.abort()
        for batch in pending:
            _call(batch.done, exc, [])

    def close(self) -> None:
        self.abort(ConnectionResetError("the stream state's Redis connection was closed"))

    async def aclose(self) -> None:
        self.close()


def _call(done: BatchDone, exc: BaseException | None, errors: list[str]) -> None:
    try:
        done(exc, errors)
    except Exception:  # noqa: BLE001 - one batch's callback must not stop the replies of the next
        log.exception("a Redis batch's callback failed")
