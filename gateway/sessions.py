"""Session placements: where a session was moved after its replica failed.

Reads are local (a dict; no Redis round trip on the request path). With Redis configured, a move is
written to ``{prefix}session:{key}`` (with a TTL) and published on ``{prefix}session-moves`` so
that every gateway worker, and a gateway started later (it loads the keys at start), agrees.
Redis being slow or gone only delays agreement; it never fails a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from unbroken.aio import stop_tasks

log = logging.getLogger(__name__)


class SessionPlacements:
    def __init__(self, max_entries: int = 200_000) -> None:
        self._local: OrderedDict[str, str] = OrderedDict()
        self._max_entries = max_entries
        self._pending: asyncio.Queue[tuple[str, str]] | None = None

    def get(self, session_key: str) -> str | None:
        return self._local.get(session_key)

    def set(self, session_key: str, replica_url: str) -> None:
        self._remember(session_key, replica_url)
        if self._pending is not None:
            try:
                self._pending.put_nowait((session_key, replica_url))
            except asyncio.QueueFull:
                log.warning("session placement queue full; %s not shared", session_key)

    def _remember(self, session_key: str, replica_url: str) -> None:
        self._local[session_key] = replica_url
        self._local.move_to_end(session_key)
        while len(self._local) > self._max_entries:
            self._local.popitem(last=False)

    def __len__(self) -> int:
        return len(self._local)


class RedisSessionSync:
    """Background tasks that share :class:`SessionPlacements` through Redis."""

    def __init__(self, placements: SessionPlacements, redis: Any, prefix: str, ttl_s: int,
                 op_timeout_s: float) -> None:
        self.placements = placements
        self.redis = redis
        self.key_prefix = f"{prefix}session:"
        self.channel = f"{prefix}session-moves"
        self.ttl_s = ttl_s
        self.op_timeout_s = op_timeout_s
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.placements._pending = asyncio.Queue(maxsize=10_000)
        self._tasks = [asyncio.create_task(self._writer(), name="session-writer"),
                       asyncio.create_task(self._subscriber(), name="session-subscriber")]
        try:
            await asyncio.wait_for(self._load_all(), timeout=5 * self.op_timeout_s)
        except Exception as e:  # noqa: BLE001 - Redis down at start: start anyway
            log.warning("could not load session placements from Redis: %s", e)

    async def stop(self) -> None:
        await stop_tasks(self._tasks, what="session placement sync")
        self._tasks = []
        self.placements._pending = None

    async def _load_all(self) -> None:
        n = 0
        async for key in self.redis.scan_iter(match=self.key_prefix + "*", count=500):
            k = key.decode() if isinstance(key, bytes) else key
            url = await self.redis.get(k)
            if url is not None:
                self.placements._remember(k[len(self.key_prefix):], url.decode() if isinstance(url, bytes) else url)
                n += 1
        if n:
            log.info("loaded %d session placements from Redis", n)

    async def _writer(self) -> None:
        assert self.placements._pending is not None
        q = self.placements._pending
        while True:
            key, url = await q.get()
            try:
                await asyncio.wait_for(self._write(key, url), timeout=self.op_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                log.warning("could not share session placement %s -> %s: %s", key, url, e)

    async def _write(self, key: str, url: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.key_prefix + key, url, ex=self.ttl_s)
        pipe.publish(self.channel, f"{key}\n{url}")
        await pipe.execute()

    async def _subscriber(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None:
                        continue
                    data = msg.get("data")
                    if isinstance(data, bytes):
                        data = data.decode()
                    if isinstance(data, str) and "\n" in data:
                        key, url = data.split("\n", 1)
                        self.placements._remember(key, url)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis gone: retry quietly
                log.debug("session subscriber: %s", e)
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001
                    pass
