"""API keys (configured as SHA-256 hashes), the admin key, sessions scoped to their key, and
per-key limits: requests and tokens per minute, requests in flight, who may ask for ``critical``.

A request holds a :class:`KeyLease` from :meth:`RateLimiter.acquire` to its end: the lease takes
one in-flight slot and reserves the request's token estimate (prompt estimate + ``max_tokens``)
in this minute's window up front; :meth:`KeyLease.release` gives the slot back and replaces the
reservation with what the request used. Limits are counted per fixed minute window. Each worker counts locally (no Redis on the request
path); with Redis configured a background task adds the local counts to
``{prefix}ratelimit:{key}:{minute}:{requests|tokens}`` every ``flush_interval_s`` and reads back
the totals of all workers, so the limit holds across workers to within one flush interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.config import AuthSection
from unbroken.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError, RateLimitError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ApiKey:
    name: str
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent_requests: int = 0
    allow_critical: bool = False


# With auth off every caller is this one principal: one trust domain, sessions shared by all.
ANONYMOUS = ApiKey("anonymous", allow_critical=True)

_SESSION_ID_CHARS = re.compile(r"[A-Za-z0-9._:@+=-]+")


class SessionScope:
    """Derives the session id a replica sees from the caller's key and its ``X-Session-ID``:
    ``s_`` + HMAC-SHA256(secret, key name + id), so two keys that send the same id never share a
    conversation's history or KV, and an id seen inside a replica or Redis cannot be replayed
    through the gateway (it would be derived again)."""

    def __init__(self, secret: str, max_chars: int, fallback_material: str = "") -> None:
        # Without a secret, one is derived from config every gateway of a deployment shares (the
        # replica token, the key hashes), so workers and gateways agree and restarts keep sessions.
        material = secret or "derived\n" + fallback_material
        self._secret = hashlib.sha256(b"unbroken-session-scope\n" + material.encode()).digest()
        self.max_chars = max_chars

    @classmethod
    def from_config(cls, auth: AuthSection, replica_token: str) -> "SessionScope":
        material = "\n".join([replica_token, auth.admin_key_sha256, *sorted(k.sha256 for k in auth.api_keys)])
        return cls(auth.session_secret, auth.session_id_max_chars, material)

    def check(self, session_id: str) -> str:
        """The client's id, checked: 400 when too long or with characters outside ``[A-Za-z0-9._:@+=-]``."""
        if len(session_id) > self.max_chars:
            raise InvalidRequestError(f"X-Session-ID is {len(session_id)} characters; at most {self.max_chars} "
                                      "are accepted", param="X-Session-ID")
        if not _SESSION_ID_CHARS.fullmatch(session_id):
            raise InvalidRequestError("X-Session-ID may hold only letters, digits and . _ : @ + = -",
                                      param="X-Session-ID")
        return session_id

    def derive(self, key: ApiKey, session_id: str) -> str:
        mac = hmac.new(self._secret, key.name.encode() + b"\n" + session_id.encode(), hashlib.sha256)
        return "s_" + mac.hexdigest()[:40]


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
        self._by_hash = {k.sha256: ApiKey(k.name, k.requests_per_minute, k.tokens_per_minute,
                                          k.max_concurrent_requests, k.allow_critical)
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
        if not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), self._admin_hash):
            raise PermissionDeniedError("this key may not use the admin API")

    @staticmethod
    def check_priority(key: ApiKey, priority: str) -> None:
        """403 when ``key`` asks for ``critical`` without ``allow_critical``."""
        if priority == "critical" and not key.allow_critical:
            raise PermissionDeniedError(f"key {key.name!r} may not send 'X-Priority: critical' (see "
                                        "auth.api_keys[].allow_critical)", param="X-Priority")


@dataclass
class _Window:
    minute: int
    num_requests: int = 0  # counted here and not yet flushed
    num_tokens: int = 0
    shared_requests: int = 0  # totals of all workers at the last flush (including ours)
    shared_tokens: int = 0
    flushing: list[int] = field(default_factory=lambda: [0, 0])


class KeyLease:
    """One request's hold on its key's limits; :meth:`release` exactly once (``async with`` /
    ``with`` does it), with the tokens the request used."""

    __slots__ = ("limiter", "key", "reserved_tokens", "minute", "_released")

    def __init__(self, limiter: "RateLimiter", key: ApiKey, reserved_tokens: int, minute: int) -> None:
        self.limiter = limiter
        self.key = key
        self.reserved_tokens = reserved_tokens
        self.minute = minute
        self._released = False

    def release(self, used_tokens: int | None = None) -> None:
        """Give the in-flight slot back; charge ``used_tokens`` instead of the reservation (None =
        keep the reservation as the charge)."""
        if self._released:
            return
        self._released = True
        self.limiter._release(self, self.reserved_tokens if used_tokens is None else max(0, used_tokens))

    def __enter__(self) -> "KeyLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RateLimiter:
    def __init__(self, clock=time.time) -> None:  # type: ignore[no-untyped-def]
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._keys: dict[str, ApiKey] = {}
        self._inflight: dict[str, int] = {}

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

    def num_inflight(self, key: ApiKey) -> int:
        return self._inflight.get(key.name, 0)

    def acquire(self, key: ApiKey, reserve_tokens: int = 0) -> KeyLease:
        """Admit one request of ``key`` and reserve ``reserve_tokens`` (capped at the key's limit), or
        raise 429 (with Retry-After) when a limit would be passed."""
        w = self._window(key)
        if key.max_concurrent_requests and self.num_inflight(key) >= key.max_concurrent_requests:
            raise RateLimitError(f"key {key.name!r} already has {key.max_concurrent_requests} requests in flight",
                                 code="concurrent_requests", retry_after_s=1.0)
        if key.requests_per_minute and w.shared_requests + w.num_requests + w.flushing[0] >= key.requests_per_minute:
            raise RateLimitError(f"requests per minute limit of {key.requests_per_minute} reached for key "
                                 f"{key.name!r}", code="requests_per_minute", retry_after_s=self._retry_after_s())
        reserve = 0
        if key.tokens_per_minute:
            reserve = min(max(0, reserve_tokens), key.tokens_per_minute)
            used = w.shared_tokens + w.num_tokens + w.flushing[1]
            if used >= key.tokens_per_minute or used + reserve > key.tokens_per_minute:
                raise RateLimitError(f"tokens per minute limit of {key.tokens_per_minute} reached for key "
                                     f"{key.name!r} ({used} used, this request may take {reserve})",
                                     code="tokens_per_minute", retry_after_s=self._retry_after_s())
            w.num_tokens += reserve
        w.num_requests += 1
        self._inflight[key.name] = self.num_inflight(key) + 1
        return KeyLease(self, key, reserve, w.minute)

    def _release(self, lease: KeyLease, used_tokens: int) -> None:
        key = lease.key
        n = self._inflight.get(key.name, 0) - 1
        if n > 0:
            self._inflight[key.name] = n
        else:
            self._inflight.pop(key.name, None)
        if key.tokens_per_minute:
            w = self._window(key)
            # the reservation was counted in its own minute; a later minute is charged the use only
            w.num_tokens += used_tokens - (lease.reserved_tokens if w.minute == lease.minute else 0)

    def admit(self, key: ApiKey) -> None:
        """Count one request with no reservation and no slot held (a lease released at once)."""
        self.acquire(key).release(0)

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
