"""The stream state's own Redis writer against a real redis-server: what it writes is what redis-py
reads; AUTH with a user or a bare password and SELECT come from the URL as redis-py takes them; a
refused write fails the batch and the connection goes on; a wrong reply or a dead server closes the
connection, and the next write opens a new one; the password never appears in an error."""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.rediswire import RedisSetWriter, RedisWireError
from unbroken.procs import free_port, start_redis

pytestmark = pytest.mark.asyncio


async def test_writes_are_read_back_by_redis_py(redis_url: str) -> None:
    w = RedisSetWriter(redis_url.replace("/0", "/3"), 2.0)
    r = aioredis.from_url(redis_url.replace("/0", "/3"))
    try:
        await w.set_many([(b"a", b"\x00\r\n\xff" * 1000, 60_000), (b"b:\xc3\xa9", b"", 5_000)])
        assert await r.get("a") == b"\x00\r\n\xff" * 1000
        assert await r.get("b:é") == b""
        assert 0 < await r.pttl("a") <= 60_000 and 0 < await r.pttl("b:é") <= 5_000
        assert await aioredis.from_url(redis_url).get("a") is None  # database 3, not 0
    finally:
        await w.aclose()
        await r.aclose()


async def test_auth_from_the_url_and_no_password_in_errors(tmp_path: Path) -> None:
    password = "p@ss:w/rd%?#"
    conf = tmp_path / "redis.conf"
    conf.write_text(f'requirepass "{password}"\nuser alice on >{password} ~* +@all\n')
    conf.chmod(0o600)
    proc, _ = start_redis(log_path=tmp_path / "redis.log", config_file=conf)
    port = urllib.parse.urlsplit(_).port
    quoted = urllib.parse.quote(password, safe="")
    try:
        for url in (f"redis://:{quoted}@127.0.0.1:{port}/0", f"redis://alice:{quoted}@127.0.0.1:{port}/0"):
            w = RedisSetWriter(url, 2.0)
            await w.set_many([(b"k", b"v", 10_000)])
            await w.aclose()
        w = RedisSetWriter(f"redis://:wrong@127.0.0.1:{port}/0", 2.0)
        with pytest.raises(RedisWireError) as e:
            await w.set_many([(b"k", b"v", 10_000)])
        assert "wrong" not in str(e.value) and password not in str(e.value)
        w = RedisSetWriter(f"redis://127.0.0.1:{port}/0", 2.0)  # no AUTH: each SET refused, NOAUTH
        with pytest.raises(RedisWireError, match="2 of 2 writes refused: NOAUTH"):
            await w.set_many([(b"k", b"v", 10_000), (b"k2", b"v", 10_000)])
        await w.aclose()
    finally:
        proc.stop()


async def test_a_refused_batch_leaves_the_connection_in_step(tmp_path: Path) -> None:
    # maxmemory 1 byte, no eviction: every SET is refused (OOM), reads still work
    proc, url = start_redis(log_path=tmp_path / "redis.log", extra=["--maxmemory", "1", "--maxmemory-policy",
                                                                     "noeviction"])
    r = aioredis.from_url(url)
    w = RedisSetWriter(url, 2.0)
    try:
        with pytest.raises(RedisWireError, match="3 of 3 writes refused: OOM"):
            await w.set_many([(b"k%d" % i, b"v" * 100, 10_000) for i in range(3)])
        await r.config_set("maxmemory", "0")
        await w.set_many([(b"k", b"after", 10_000)])  # the same connection, the next reply is ours
        assert await r.get("k") == b"after"
    finally:
        await w.aclose()
        await r.aclose()
        proc.stop()


async def test_a_foreign_reply_or_a_dead_server_closes_and_reopens(tmp_path: Path) -> None:
    replies = [b"$3\r\nabc\r\n", b"+OK\r\n"]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(replies.pop(0))
        await writer.drain()
        await reader.read(65536)  # until the client closes
        writer.close()

    port = free_port()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    w = RedisSetWriter(f"redis://127.0.0.1:{port}/0", 2.0)
    try:
        with pytest.raises(RedisWireError, match="unexpected Redis reply"):
            await w.set_many([(b"k", b"v", 1000)])
        await w.set_many([(b"k", b"v", 1000)])  # a new connection, a proper reply
        server.close()
        await server.wait_closed()
        w.close()
        with pytest.raises(OSError):
            await w.set_many([(b"k", b"v", 1000)])  # nothing listens: refused, and no hang
    finally:
        await w.aclose()


async def test_send_counts_replies_as_they_come_and_abort_fails_what_waits(redis_url: str) -> None:
    """``send`` writes from the caller's own call; the batch's callback gets its outcome when the
    replies are in, and a connection dropped with batches unanswered fails each of them once."""
    w = RedisSetWriter(redis_url, 2.0)
    got: list[tuple[BaseException | None, list[str]]] = []
    try:
        assert not w.send([(b"k", b"v", 1000)], lambda e, errs: got.append((e, errs)))  # not connected
        await w.connect()
        for i in range(3):
            assert w.send([(b"k%d" % i, b"v", 10_000), (b"x%d" % i, b"w", 10_000)],
                          lambda e, errs: got.append((e, errs)))
        for _ in range(200):
            if len(got) == 3:
                break
            await asyncio.sleep(0.01)
        assert got == [(None, [])] * 3 and w.oldest_unanswered_s() is None
        assert await aioredis.from_url(redis_url).get("x2") == b"w"
    finally:
        await w.aclose()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(30)

    port = free_port()
    server = await asyncio.start_server(never_answer, "127.0.0.1", port)
    w = RedisSetWriter(f"redis://127.0.0.1:{port}/0", 2.0)
    got.clear()
    try:
        await w.connect()
        assert w.send([(b"k", b"v", 1000)], lambda e, errs: got.append((e, errs)))
        assert w.oldest_unanswered_s() is not None and got == []
        w.abort(TimeoutError("no answer"))
        assert len(got) == 1 and isinstance(got[0][0], TimeoutError) and not w.connected
    finally:
        await w.aclose()
        server.close()
