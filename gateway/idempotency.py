"""Non-stream requests repeated with the same ``X-Request-ID``: one generation, one answer.

A client that lost its connection before a non-stream answer arrived sends the same body again with
the same ``X-Request-ID`` (``unbroken.client`` does). Within ``streams.idempotency_window_s`` the
gateway returns the first answer instead of generating twice: from this process while it is being
made (the repeat waits for it), or from Redis when another gateway made it or is making it.

Redis: one key, ``{prefix}answer:{request id}``. The gateway that generates first claims it with
``SET NX`` (``P`` + its id): one command on the request's path. The claim lives ``CLAIM_TTL_S``
(3 s) and its gateway renews it while it generates, so the claim of a gateway that died goes
within 3 s and a repeat elsewhere generates instead of waiting on it. The answer then replaces it (``A`` + JSON: principal, body_sha256, status, body; the window as
TTL). A gateway whose claim fails reads the key: an answer is returned, a claim is polled until it
becomes an answer or goes (the other gateway failed: generate here). Only 200 answers are kept. What is read back is
checked (size, types) before use. Redis down: repeats are caught within this gateway only.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import orjson

from gateway.config import StreamsSection
from gateway.metrics import GatewayMetrics
from unbroken.errors import ConflictError

log = logging.getLogger(__name__)

POLL_S = 0.05
CLAIM_TTL_S = 3.0  # a claim lives this long unless its gateway renews it (a dead gateway's claim goes)
Answer = tuple[int, bytes]


@dataclass
class _Entry:
    principal: str
    body_sha256: str
    future: asyncio.Future[Answer]
    expires_s: float


class AnswerCache:
    """Answers of non-stream requests by request id; :meth:`run` generates once per id."""

    def __init__(self, config: StreamsSection, key_prefix: str, metrics: GatewayMetrics, op_timeout_s: float) -> None:
        self.config = config
        self.prefix = key_prefix
        self.metrics = metrics
        self.op_timeout_s = op_timeout_s
        self.redis: Any = None
        self._local: dict[str, _Entry] = {}
        self._owner = os.urandom(8).hex()
        self._tasks: set[asyncio.Task[None]] = set()

    def _check(self, entry_principal: str, entry_sha: str, principal: str, sha: str) -> bool:
        """Whether a stored answer may be returned; a different body is the client's mistake (409)."""
        if entry_principal != principal:
            return False  # another key's request id: not theirs to see, and not a conflict to report
        if entry_sha != sha:
            raise ConflictError("this X-Request-ID was used for a different request body; use a new id")
        return True

    def _sweep(self, now: float) -> None:
        if len(self._local) > 4096:
            for rid in [r for r, e in self._local.items() if e.future.done() and e.expires_s < now]:
                del self._local[rid]

    async def run(self, request_id: str, principal: str, sha: str, generate: Callable[[], Awaitable[Answer]],
                  deadline_s: float) -> tuple[Answer, str | None]:
        """The answer for ``request_id``, and where a repeat's answer came from (None: generated here)."""
        now = time.monotonic()
        self._sweep(now)
        entry = self._local.get(request_id)
        if entry is not None and (not entry.future.done() or entry.expires_s > now) \
                and self._check(entry.principal, entry.body_sha256, principal, sha):
            answer = await asyncio.shield(entry.future)
            self.metrics.idempotent_replays.labels("local").inc()
            return answer, "local"
        locked = False
        if self.redis is not None:
            found, locked = await self._shared(request_id, principal, sha, deadline_s)
            if found is not None:
                self.metrics.idempotent_replays.labels("redis").inc()
                return found, "redis"
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        entry = _Entry(principal, sha, fut, float("inf"))
        self._local[request_id] = entry
        renew = asyncio.ensure_future(self._renew_claim(request_id)) if locked else None
        try:
            answer = await generate()
        except BaseException as e:
            if renew is not None:
                renew.cancel()
            del self._local[request_id]  # a failure is not an answer: a repeat tries again
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters get it, nobody else
            if locked:
                self._background(self._unlock(request_id))
            raise
        if renew is not None:
            renew.cancel()
        entry.expires_s = time.monotonic() + self.config.idempotency_window_s
        fut.set_result(answer)
        if locked:  # only the claim's holder writes the key (never over another key's answer)
            self._background(self._store(request_id, principal, sha, answer, locked))
        return answer, None

    async def _shared(self, request_id: str, principal: str, sha: str,
                      deadline_s: float) -> tuple[Answer | None, bool]:
        """An answer from Redis (waiting while another gateway holds the lock), or whether we took the lock."""
        key = f"{self.prefix}answer:{request_id}"
        claim_ms = int(CLAIM_TTL_S * 1000)
        try:
            while True:
                async with asyncio.timeout(self.op_timeout_s):
                    if await self.redis.set(key, b"P" + self._owner.encode(), nx=True, px=claim_ms):
                        return None, True
                async with asyncio.timeout(self.op_timeout_s):
                    raw = await self.redis.get(key)
                if isinstance(raw, bytes) and raw.startswith(b"A"):
                    found = self._parse(raw[1:], principal, sha)
                    return found, False  # None: another key's id, generated here without sharing
                if time.monotonic() + POLL_S >= deadline_s:
                    return None, False
                await asyncio.sleep(POLL_S)  # claimed by another gateway (or just gone): look again
        except ConflictError:
            raise
        except Exception as e:  # noqa: BLE001 - Redis down: repeats are caught locally only
            log.debug("answer cache unavailable: %s", e)
            return None, False

    def _parse(self, raw: bytes, principal: str, sha: str) -> Answer | None:
        if not isinstance(raw, bytes) or len(raw) > 2 * self.config.max_answer_bytes:
            return None
        try:
            obj = orjson.loads(raw)
            if not isinstance(obj, dict):
                return None
            p, s, status, body = obj.get("principal"), obj.get("body_sha256"), obj.get("status"), obj.get("body")
            if not (isinstance(p, str) and isinstance(s, str) and isinstance(status, int) and isinstance(body, str)):
                return None
            if not self._check(p, s, principal, sha):
                return None
            return status, base64.b64decode(body, validate=True)
        except (orjson.JSONDecodeError, ValueError):
            return None

    async def _renew_claim(self, request_id: str) -> None:
        """Keep this gateway's claim alive while it generates (``XX``: only while the key exists)."""
        key, value = f"{self.prefix}answer:{request_id}", b"P" + self._owner.encode()
        while True:
            await asyncio.sleep(CLAIM_TTL_S / 3)
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    await self.redis.set(key, value, xx=True, px=int(CLAIM_TTL_S * 1000))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the claim may lapse: a repeat elsewhere then generates too
                pass

    async def _store(self, request_id: str, principal: str, sha: str, answer: Answer, locked: bool) -> None:
        status, body = answer
        try:
            async with asyncio.timeout(self.op_timeout_s):
                key = f"{self.prefix}answer:{request_id}"
                if status == 200 and len(body) <= self.config.max_answer_bytes:
                    value = b"A" + orjson.dumps({"principal": principal, "body_sha256": sha, "status": status,
                                                 "body": base64.b64encode(body).decode()})
                    await self.redis.set(key, value, ex=self.config.idempotency_window_s)
                elif locked:
                    await self.redis.delete(key)
        except Exception as e:  # noqa: BLE001 - the answer was given; only repeats elsewhere lose it
            log.debug("answer of %s not shared: %s", request_id, e)

    async def _unlock(self, request_id: str) -> None:
        try:
            async with asyncio.timeout(self.op_timeout_s):
                await self.redis.delete(f"{self.prefix}answer:{request_id}")
        except Exception:  # noqa: BLE001 - the claim expires by itself
            pass

    def _background(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
