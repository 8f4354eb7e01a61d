"""A write-only Redis connection for the stream state's hot path: ``SET key value PX ttl``, pipelined
on one socket, encoded here.

Every stream the gateway relays is written to Redis as it opens and while it grows. Through
redis-py a one-command pipeline costs the gateway about 280 µs of CPU on this project's reference
machine (a lone ``SET`` 190 µs: command packing, the connection pool, the pure-Python reply
parser); written here it is about 40 µs, most of it the event loop's. Reads, pub/sub and
everything else stay on redis-py.

The URL is parsed by redis-py, so the same forms work: ``redis://``, ``rediss://`` (TLS, verified
unless ``ssl_cert_reqs=none``; ``ssl_ca_certs`` honoured), ``unix://``, a username and password
(``AUTH``), a database (``SELECT``). The replies are read back one line each and only ``+OK`` is
success: an error reply fails the batch after every reply was read (the socket stays in step);
anything else, a timeout or a cancel closes the connection, and the next write opens a new one.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from unbroken.resp import setup_commands

_MAX_REPLY_BYTES = 4096


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


class RedisSetWriter:
    """``SET ... PX`` in batches on one connection, opened on first use and after any failure."""

    def __init__(self, url: str, connect_timeout_s: float) -> None:
        self._opts: dict[str, Any] = parse_url(url)
        self.connect_timeout_s = connect_timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

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

    async def _connect(self) -> None:
        o = self._opts
        cls = o.get("connection_class")
        async with asyncio.timeout(self.connect_timeout_s):
            if cls is UnixDomainSocketConnection:
                reader, writer = await asyncio.open_unix_connection(o["path"])
            else:
                tls = self._ssl_context() if cls is SSLConnection else None
                reader, writer = await asyncio.open_connection(o.get("host", "localhost"), o.get("port", 6379),
                                                               ssl=tls)
            self._reader, self._writer = reader, writer
            hello = setup_commands(o.get("username"), o.get("password"), o.get("db"))
            if hello:
                writer.write(b"".join(hello))
                await writer.drain()
                errors = await self._read_replies(len(hello))
                if errors:
                    # the server's words, never the password: AUTH's reply does not repeat it
                    raise RedisWireError(f"Redis refused the connection's set-up: {errors[0]}")

    async def _read_replies(self, n: int) -> list[str]:
        assert self._reader is not None
        errors: list[str] = []
        for _ in range(n):
            line = await self._reader.readuntil(b"\r\n")
            if len(line) > _MAX_REPLY_BYTES:
                raise RedisWireError("Redis reply too long")
            if line[:1] == b"-":
                errors.append(line[1:-2].decode(errors="replace"))
            elif line != b"+OK\r\n":
                raise RedisWireError(f"unexpected Redis reply {line[:40]!r}")
        return errors

    async def set_many(self, items: list[tuple[bytes, bytes, int]]) -> None:
        """``SET key value PX ttl_ms`` for each item, in one write; raises RedisWireError (or a
        timeout/OSError) when any failed. The caller bounds the time."""
        if not items:
            return
        try:
            if self._writer is None:
                await self._connect()
            assert self._writer is not None
            self._writer.write(b"".join(encode_set_px(k, v, ttl) for k, v, ttl in items))
            await self._writer.drain()
            errors = await self._read_replies(len(items))
        except BaseException:
            self.close()
            raise
        if errors:
            raise RedisWireError(f"{len(errors)} of {len(items)} writes refused: {errors[0]}")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def aclose(self) -> None:
        writer = self._writer
        self.close()
        if writer is not None:
            try:
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
