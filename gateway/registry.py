"""Dynamic replicas: discover the ones that announce themselves in Redis, and share admin drains.

A replica keeps ``unbroken:replica:{replica_id}`` (JSON ``{"replica_id", "url", "model",
"adapters", "started_at_s"}``, with a TTL it renews). Every ``discovery_interval_ms`` the gateway
SCANs for those keys, adds new replicas and removes registry replicas whose key is gone. Static
replicas from config are never removed. Drains set through the admin API of any worker are kept
in ``{prefix}drain:{replica_id}`` and applied by every worker on the same tick.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import orjson

from gateway.replicaset import ReplicaSet, ReplicaSource

log = logging.getLogger(__name__)

REPLICA_KEY_PREFIX = "unbroken:replica:"


class RegistryDiscovery:
    def __init__(self, replicas: ReplicaSet, redis: Any, prefix: str, interval_s: float,
                 op_timeout_s: float, on_drain: Callable[[str], None]) -> None:
        self.replicas = replicas
        self.redis = redis
        self.drain_prefix = f"{prefix}drain:"
        self.interval_s = interval_s
        self.op_timeout_s = op_timeout_s
        self._on_drain = on_drain
        self._task: asyncio.Task[None] | None = None
        self.num_errors = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="registry-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.sync_once(), timeout=max(self.op_timeout_s * 4, self.interval_s))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis gone: keep what we know
                self.num_errors += 1
                log.debug("registry discovery failed: %s", e)
            await asyncio.sleep(self.interval_s)

    async def _scan(self, match: str) -> list[str]:
        keys: list[str] = []
        async for key in self.redis.scan_iter(match=match, count=1000):
            keys.append(key.decode() if isinstance(key, bytes) else key)
        return keys

    async def sync_once(self) -> None:
        keys = await self._scan(REPLICA_KEY_PREFIX + "*")
        values = await self.redis.mget(keys) if keys else []
        seen: set[str] = set()
        for key, raw in zip(keys, values):
            if raw is None:
                continue
            try:
                info = orjson.loads(raw)
                url = str(info["url"]).rstrip("/")
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.warning("ignoring malformed registry entry %s", key)
                continue
            seen.add(url)
            if url not in self.replicas.by_url:
                model = str(info.get("model") or "")
                models = [model, *(f"{model}:{a}" for a in info.get("adapters") or [])] if model else []
                self.replicas.add(url, ReplicaSource.REGISTRY, replica_id=str(info.get("replica_id") or ""),
                                  models=models)
                log.info("replica %s joined from the registry", url)
        for rep in list(self.replicas):
            if rep.source is ReplicaSource.REGISTRY and rep.url not in seen:
                self.replicas.remove(rep.url)
                log.info("replica %s left the registry", rep.url)
        for key in await self._scan(self.drain_prefix + "*"):
            self._on_drain(key[len(self.drain_prefix):])

    async def publish_drain(self, replica_id: str, ttl_s: int = 24 * 3600) -> None:
        await asyncio.wait_for(self.redis.set(self.drain_prefix + replica_id, "1", ex=ttl_s),
                               timeout=self.op_timeout_s)
