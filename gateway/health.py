"""Heartbeats: is each replica alive? (Whether it is failing requests is the breaker's business.)

One task per replica polls ``GET /state`` every ``heartbeat_interval_ms`` with a
``heartbeat_timeout_ms`` timeout, on a connection pool of its own (a busy request pool never delays
a heartbeat). Connection refused means the process is gone: UNHEALTHY at once. A timeout or a bad
answer is a miss: SUSPECT (out of rotation) after ``suspect_after_misses``, UNHEALTHY after
``unhealthy_after_misses``. ``healthy_after_successes`` good answers bring it back. A replica that
reports ``status: draining`` (or was drained by the admin API) is DRAINING; ``loading`` is UNHEALTHY.
The request path may also call :meth:`HealthMonitor.mark_suspect` when a connection to a replica
fails, so that it leaves rotation before the next poll.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import orjson

from gateway.config import HealthSection
from gateway.replicaset import Replica, ReplicaSet, ReplicaState, report_from_json

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(self, replicas: ReplicaSet, config: HealthSection, headers: dict[str, str] | None = None) -> None:
        self.replicas = replicas
        self.config = config
        self.headers = headers or {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[Replica, asyncio.Task[None]] = {}
        replicas.add_listener(self._on_replica_event)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=self.config.heartbeat_timeout_ms / 1000.0),
            headers=self.headers,
        )
        for rep in self.replicas:
            self._start_task(rep)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _on_replica_event(self, event: str, rep: Replica) -> None:
        if self._session is None:
            return
        if event == "added":
            self._start_task(rep)
        elif event == "removed":
            task = self._tasks.pop(rep, None)
            if task is not None:
                task.cancel()

    def _start_task(self, rep: Replica) -> None:
        if rep not in self._tasks:
            self._tasks[rep] = asyncio.create_task(self._poll_loop(rep), name=f"heartbeat-{rep.url}")

    async def _poll_loop(self, rep: Replica) -> None:
        interval_s = self.config.heartbeat_interval_ms / 1000.0
        while True:
            started = time.monotonic()
            await self.poll_once(rep)
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    async def poll_once(self, rep: Replica) -> None:
        assert self._session is not None
        sent_s = time.monotonic()
        try:
            async with self._session.get(rep.url + "/state") as resp:
                body = await resp.read()
                if resp.status != 200:
                    self._miss(rep, f"/state answered {resp.status}")
                    return
                report = report_from_json(orjson.loads(body))
        except asyncio.CancelledError:
            raise
        except aiohttp.ClientConnectorError as e:
            self._down(rep, f"connect failed: {e.os_error or e}")
            return
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            self._miss(rep, "heartbeat timed out")
            return
        except (aiohttp.ClientError, orjson.JSONDecodeError, ValueError, TypeError, OSError) as e:
            self._miss(rep, f"heartbeat failed: {type(e).__name__}: {e}")
            return
        rep.stability.record_rtt(time.monotonic() - sent_s)
        self._ok(rep, report)

    def _ok(self, rep: Replica, report) -> None:  # type: ignore[no-untyped-def]
        rep.last_heartbeat_s = time.monotonic()
        rep.last_heartbeat_error = ""
        rep.num_consecutive_misses = 0
        rep.num_consecutive_successes += 1
        self.replicas.set_report(rep, report)
        if report.status == "draining":
            self.replicas.set_state(rep, ReplicaState.DRAINING)
        elif report.status == "loading":
            self.replicas.set_state(rep, ReplicaState.UNHEALTHY)
        elif rep.num_consecutive_successes >= self.config.healthy_after_successes:
            self.replicas.set_state(rep, ReplicaState.HEALTHY)

    def _miss(self, rep: Replica, reason: str) -> None:
        rep.last_heartbeat_error = reason
        rep.num_consecutive_successes = 0
        rep.num_consecutive_misses += 1
        if rep.num_consecutive_misses >= self.config.unhealthy_after_misses:
            self.replicas.set_state(rep, ReplicaState.UNHEALTHY)
        elif rep.num_consecutive_misses >= self.config.suspect_after_misses and rep.state is ReplicaState.HEALTHY:
            self.replicas.set_state(rep, ReplicaState.SUSPECT)

    def _down(self, rep: Replica, reason: str) -> None:
        rep.last_heartbeat_error = reason
        rep.num_consecutive_successes = 0
        rep.num_consecutive_misses = max(rep.num_consecutive_misses + 1, self.config.unhealthy_after_misses)
        self.replicas.set_state(rep, ReplicaState.UNHEALTHY)

    def mark_suspect(self, rep: Replica, reason: str) -> None:
        """The request path could not reach ``rep``: out of rotation until a heartbeat answers."""
        rep.last_heartbeat_error = reason
        rep.num_consecutive_successes = 0
        if rep.state is ReplicaState.HEALTHY:
            self.replicas.set_state(rep, ReplicaState.SUSPECT)
