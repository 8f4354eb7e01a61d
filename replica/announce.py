"""Announce this replica in the Redis registry so gateways find it.

Key ``{key_prefix}replica:{replica_id}`` (``registry.key_prefix``, ``unbroken:`` by default, the
gateway's ``redis.key_prefix``): a JSON string ``{"replica_id", "url", "model", "adapters",
"started_at_s"}`` set with ``PX`` = ttl and renewed every ttl/3; deleted on clean shutdown (or
when draining begins), so gateways drop the replica at once instead of after the ttl.

Redis being down never disturbs serving: the first failure is logged, the announcer keeps
retrying at its renewal interval, and recovery is logged once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, field

import orjson

from unbroken.aio import stop_tasks
from unbroken.credentials import redact_url

log = logging.getLogger(__name__)

KEY_PREFIX = "unbroken:"


def registry_key(replica_id: str, key_prefix: str = KEY_PREFIX) -> str:
    return f"{key_prefix}replica:{replica_id}"


@dataclass
class ReplicaAnnouncement:
    """The registry entry's value."""

    replica_id: str
    url: str
    model: str
    adapters: list[str] = field(default_factory=list)
    started_at_s: float = 0.0

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))


class RegistryAnnouncer:
    """Owns one redis.asyncio client and one renewal task."""

    def __init__(self, redis_url: str, announcement: ReplicaAnnouncement, ttl_s: float,
                 op_timeout_s: float = 1.0, key_prefix: str = KEY_PREFIX) -> None:
        self.redis_url = redis_url
        self.announcement = announcement
        self.ttl_s = ttl_s
        self.op_timeout_s = min(op_timeout_s, max(0.05, ttl_s / 3))
        self.key = registry_key(announcement.replica_id, key_prefix)
        self.num_failures = 0
        self.num_renewals = 0
        self._client = None
        self._task: asyncio.Task[None] | None = None

    def _redis(self):  # type: ignore[no-untyped-def]
        if self._client is None:
            import redis.asyncio as aioredis

            self._client = aioredis.from_url(
                self.redis_url, socket_timeout=self.op_timeout_s,
                socket_connect_timeout=self.op_timeout_s, retry_on_timeout=False)
        return self._client

    async def announce_once(self) -> bool:
        """Set the key with its ttl; False (logged once per outage) when Redis is unreachable."""
        try:
            await asyncio.wait_for(
                self._redis().set(self.key, self.announcement.to_json(), px=int(self.ttl_s * 1000)),
                self.op_timeout_s * 2)
        except (asyncio.TimeoutError, OSError, Exception) as e:  # noqa: BLE001 - never break serving
            if self.num_failures == 0:
                log.warning("registry: cannot announce %s to %s (%s); retrying every %.2fs",
                            self.key, redact_url(self.redis_url), e, self.ttl_s / 3)
            self.num_failures += 1
            return False
        if self.num_failures:
            log.info("registry: announcing %s again after %d failed attempts", self.key, self.num_failures)
            self.num_failures = 0
        self.num_renewals += 1
        return True

    async def _run(self) -> None:
        while True:
            await self.announce_once()
            await asyncio.sleep(self.ttl_s / 3)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="registry-announcer")

    async def stop(self) -> None:
        """Stop renewing and delete the key (best effort), then close the client."""
        if self._task is not None:
            await stop_tasks([self._task], what="registry announcer")
            self._task = None
        if self._client is None:
            return
        try:
            await asyncio.wait_for(self._client.delete(self.key), self.op_timeout_s * 2)
        except Exception as e:  # noqa: BLE001
            log.warning("registry: could not delete %s (%s); it expires in %.1fs", self.key, e, self.ttl_s)
        try:
            await self._client.aclose()
        except Exception:  # noqa: BLE001
            pass
        self._client = None


__all__ = ["KEY_PREFIX", "RegistryAnnouncer", "ReplicaAnnouncement", "registry_key"]
