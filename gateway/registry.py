"""Dynamic replicas: discover the ones that announce themselves in Redis, and share admin drains.

A replica keeps ``{prefix}replica:{replica_id}`` (``redis.key_prefix``, ``unbroken:`` by default; JSON ``{"replica_id", "url", "model",
"adapters", "started_at_s"}``, with a TTL it renews). Every ``discovery_interval_ms`` the gateway
SCANs for those keys, adds new replicas and removes registry replicas whose key is gone. Static
replicas from config are never removed. Drains set through the admin API of any worker are kept
in ``{prefix}drain:{replica_id}`` and applied by every worker on the same tick.

Redis is not trusted: each entry is checked on its own (:func:`parse_entry`), and one that is
malformed, or whose URL is not ``http(s)://`` to a host in ``redis.registry_allowed_hosts``, is
skipped and counted (``num_rejected``); it never stops the pass for the others.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

import orjson

from gateway.replicaset import ReplicaSet, ReplicaSource
from unbroken.aio import stop_tasks

log = logging.getLogger(__name__)

MAX_ENTRY_BYTES = 64 * 1024
MAX_ADAPTERS = 256
MAX_NAME_CHARS = 256


class RegistryEntryError(ValueError):
    """A registry entry that is not used (the message says why)."""


@dataclass(frozen=True)
class RegistryEntry:
    replica_id: str
    url: str
    model: str
    adapters: tuple[str, ...]


class HostAllowList:
    """Host names, IP addresses and CIDR ranges a registry URL may point at."""

    def __init__(self, entries: list[str]) -> None:
        self.names = {e.strip().lower() for e in entries if e.strip() and "/" not in e and not _is_ip(e)}
        self.networks = [ipaddress.ip_network(e.strip(), strict=False) for e in entries
                         if "/" in e or _is_ip(e)]

    def allows(self, host: str) -> bool:
        host = host.strip("[]").lower()
        if host in self.names:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s.strip().strip("[]"))
        return True
    except ValueError:
        return False


def _name(v: Any, what: str, required: bool) -> str:
    if v is None and not required:
        return ""
    if not isinstance(v, str) or (required and not v) or len(v) > MAX_NAME_CHARS:
        raise RegistryEntryError(f"{what} must be a string of 1..{MAX_NAME_CHARS} characters")
    return v


def parse_entry(raw: bytes | str, allowed: HostAllowList) -> RegistryEntry:
    """One registry value, checked field by field; raises :class:`RegistryEntryError`."""
    if len(raw) > MAX_ENTRY_BYTES:
        raise RegistryEntryError(f"entry of {len(raw)} bytes (at most {MAX_ENTRY_BYTES})")
    try:
        info = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RegistryEntryError("not JSON") from None
    if not isinstance(info, dict):
        raise RegistryEntryError("not a JSON object")
    url = _name(info.get("url"), "url", True).rstrip("/")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise RegistryEntryError("url has a bad port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password \
            or parts.query or parts.fragment or (parts.path not in ("", "/")) or port == 0:
        raise RegistryEntryError(f"url {url!r} is not http(s)://host:port")
    if not allowed.allows(parts.hostname):
        raise RegistryEntryError(f"url {url!r}: host {parts.hostname!r} is not in redis.registry_allowed_hosts")
    adapters = info.get("adapters")
    if adapters is None:
        adapters = []
    if not isinstance(adapters, list) or len(adapters) > MAX_ADAPTERS:
        raise RegistryEntryError(f"adapters must be a list of at most {MAX_ADAPTERS} names")
    return RegistryEntry(replica_id=_name(info.get("replica_id"), "replica_id", False), url=url,
                         model=_name(info.get("model"), "model", False),
                         adapters=tuple(_name(a, "an adapter", True) for a in adapters))


class RegistryDiscovery:
    def __init__(self, replicas: ReplicaSet, redis: Any, prefix: str, interval_s: float,
                 op_timeout_s: float, on_drain: Callable[[str], None],
                 allowed_hosts: list[str] | None = None) -> None:
        self.replicas = replicas
        self.redis = redis
        self.replica_prefix = f"{prefix}replica:"
        self.drain_prefix = f"{prefix}drain:"
        self.allowed = HostAllowList(["127.0.0.0/8", "::1", "localhost"] if allowed_hosts is None else allowed_hosts)
        self.num_rejected = 0  # registry entries skipped (malformed or outside the allow-list)
        self._warned: set[tuple[str, str]] = set()
        self.interval_s = interval_s
        self.op_timeout_s = op_timeout_s
        self._on_drain = on_drain
        self._task: asyncio.Task[None] | None = None
        self.num_errors = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="registry-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task], what="registry discovery")
            self._task = None

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
        keys = await self._scan(self.replica_prefix + "*")
        values = await self.redis.mget(keys) if keys else []
        seen: set[str] = set()
        for key, raw in zip(keys, values):
            if raw is None:
                continue
            try:
                entry = parse_entry(raw, self.allowed)
            except RegistryEntryError as e:
                self.num_rejected += 1
                if (key, str(e)) not in self._warned and len(self._warned) < 10_000:
                    self._warned.add((key, str(e)))
                    log.warning("ignoring registry entry %s: %s", key[:200], e)
                continue
            seen.add(entry.url)
            if entry.url not in self.replicas.by_url:
                m = entry.model
                models = [m, *(f"{m}:{a}" for a in entry.adapters)] if m else []
                self.replicas.add(entry.url, ReplicaSource.REGISTRY, replica_id=entry.replica_id, models=models)
                log.info("replica %s joined from the registry", entry.url)
        for rep in list(self.replicas):
            if rep.source is ReplicaSource.REGISTRY and rep.url not in seen:
                self.replicas.remove(rep.url)
                log.info("replica %s left the registry", rep.url)
        for key in await self._scan(self.drain_prefix + "*"):
            replica_id = key[len(self.drain_prefix):]
            if self.replicas.find(replica_id) is not None:  # only ids we know: Redis is not trusted
                self._on_drain(replica_id)

    async def publish_drain(self, replica_id: str, ttl_s: int = 24 * 3600) -> None:
        await asyncio.wait_for(self.redis.set(self.drain_prefix + replica_id, "1", ex=ttl_s),
                               timeout=self.op_timeout_s)
