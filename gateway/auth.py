"""API keys (configured as SHA-256 hashes), the admin key, and per-key limits per minute.

Limits are counted per fixed minute window. Each worker counts locally (no Redis on the request
path); with Redis configured a background task adds the local counts to
``{prefix}ratelimit:{key}:{minute}:{requests|tokens}`` every ``flush_interval_s`` and reads back
the totals of all workers, so the limit holds across workers to within one flush interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.config import AuthSection
from unbroken.errors import AuthenticationError, PermissionDeniedError, RateLimitError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ApiKey:
    name: str
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


ANONYMOUS = ApiKey("anonymous")


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    def __init__(self, config: AuthSection) -> None:
        self.enabled = config.enabled
        self._by_hash = {k.sha256: ApiKey(k.name, k.requests_per_minute, k.tokens_per_minute)
                         for k in config.api_keys}
        self._admin_hash = config.admin_key_sha256.strip().lower()

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The caller's key; :data:`ANONYMOUS` when auth is off. Raises 401 otherwise."""
        if not self.enabled:
            return ANONYMOUS
        token = _bearer(authorization)
        if token is None:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer KEY'")
        key = self._by_hash.get(hashlib.sha256(token.encode()).hexdigest())
        if key is None:
            raise AuthenticationError("invalid API key")
        return key

    def check_admin(self, authorization: str | None) -> None:
        """401 without a key, 403 with a key that is not the admin key."""
        if not self._admin_hash:
            if self.enabled:
                raise PermissionDeniedError("the admin API is disabled (no auth.admin_key_sha256 configured)")
            return
        token = _bearer(authorization)
        if token is None:
            raise AuthenticationError("missing admin key: send 'Authorization: Bearer ADMIN_KEY'")
        if hashlib.sha256(token.encode()).hexdigest() != self._admin_hash:
            raise PermissionDeniedError("this key may not use the admin API")


@dataclass
class _Window:
    minute: int
    num_requests: int = 0  # counted here and not yet flushed
    num_tokens: int = 0
    shared_requests: int = 0  # totals of all workers at the last flush (including ours)
    shared_tokens: int = 0
    flushing: list[int] = field(default_factory=lambda: [0, 0])


class RateLimiter:
    def __init__(self, clock=time.time) -> None:  # type: ignore[no-untyped-def]
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._keys: dict[str, ApiKey] = {}

    def _window(self, key: ApiKey) -> _Window:
        minute = int(self._clock() // 60)
        w = self._windows.get(key.name)
        if w is None or w.minute != minute:
            w = _Window(minute)
            self._windows[key.name] = w
            self._keys[key.name] = key
        return w

    def _retry_after_s(self) -> float:
        return 60.0 - (self._clock() % 60.0)

    def admit(self, key: ApiKey) -> None:
        """Count one request, or raise 429 (with Retry-After) when a limit is reached."""
        if not key.requests_per_minute and not key.tokens_per_minute:
            return
        w = self._window(key)
        if key.requests_per_minute and w.shared_requests + w.num_requests + w.flushing[0] >= key.requests_per_minute:
            raise RateLimitError(f"requests per minute limit of {key.requests_per_minute} reached for key "
                                 f"{key.name!r}", code="requests_per_minute", retry_after_s=self._retry_after_s())
        if key.tokens_per_minute and w.shared_tokens + w.num_tokens + w.flushing[1] >= key.tokens_per_minute:
            raise RateLimitError(f"tokens per minute limit of {key.tokens_per_minute} reached for key "
                                 f"{key.name!r}", code="tokens_per_minute", retry_after_s=self._retry_after_s())
        w.num_requests += 1

    def add_tokens(self, key: ApiKey, num_tokens: int) -> None:
        if key.tokens_per_minute and num_tokens > 0:
            self._window(key).num_tokens += num_tokens

    async def flush(self, redis: Any, prefix: str) -> None:
        """Share local counts through Redis and read back the totals of every worker."""
        for name, w in list(self._windows.items()):
            if w.num_requests == 0 and w.num_tokens == 0 and w.shared_requests == 0 and w.shared_tokens == 0:
                continue
            dr, dt = w.num_requests, w.num_tokens
            w.num_requests = w.num_tokens = 0
            w.flushing = [dr, dt]
            base = f"{prefix}ratelimit:{name}:{w.minute}:"
            try:
                pipe = redis.pipeline(transaction=False)
                pipe.incrby(base + "requests", dr)
                pipe.incrby(base + "tokens", dt)
                pipe.expire(base + "requests", 120)
                pipe.expire(base + "tokens", 120)
                total_r, total_t, _, _ = await pipe.execute()
                w.shared_requests, w.shared_tokens = int(total_r), int(total_t)
            except Exception:  # noqa: BLE001 - keep counting locally
                w.shared_requests += dr
                w.shared_tokens += dt
                raise
            finally:
                w.flushing = [0, 0]


async def run_rate_limit_sync(limiter: RateLimiter, redis: Any, prefix: str, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.wait_for(limiter.flush(redis, prefix), timeout=max(interval_s, 0.5))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            log.debug("rate limit sync failed: %s", e)
