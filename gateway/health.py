"""Heartbeats: is each replica alive? (Whether it is failing requests is the breaker's business.)

One task per replica polls it through the probe of its kind (``gateway/backends/``: ``GET /state``
for the project's replicas; health, model list and Prometheus metrics for other engines) every ``heartbeat_interval_ms`` with a
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
from typing import Callable

import aiohttp
import orjson

from gateway.backends import BackendProbe, ProbeError, make_probe
from gateway.config import HealthSection
from gateway.replicaset import Replica, ReplicaSet, ReplicaState
from unbroken.aio import stop_tasks

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(self, replicas: ReplicaSet, config: HealthSection, headers: dict[str, str] | None = None,
                 kind_of: Callable[[Replica], str] | None = None,
                 resume_overrides: dict[str, str] | None = None) -> None:
        self.replicas = replicas
        self.config = config
        self.headers = headers or {}
        self._kind_of = kind_of or (lambda rep: "unbroken")
        self._resume_overrides = resume_overrides or {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[Replica, asyncio.Task[None]] = {}
        self._probes: dict[Replica, BackendProbe] = {}
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
        await stop_tasks(tasks, what="heartbeat probes")
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _on_replica_event(self, event: str, rep: Replica) -> None:
        if self._session is None:
            return
        if event == "added":
            self._start_task(rep)
        elif event == "removed":
            self._probes.pop(rep, None)
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

    def probe_for(self, rep: Replica) -> BackendProbe:
        probe = self._probes.get(rep)
        if probe is None:
            probe = self._probes[rep] = make_probe(self._kind_of(rep))
            self._apply_kind(rep, probe)
        return probe

    def _apply_kind(self, rep: Replica, probe: BackendProbe) -> None:
        rep.kind = probe.kind
        rep.backend_version = probe.version
        t = probe.traits
        override = self._resume_overrides.get(probe.kind)
        rep.resume_chat = override or t.resume_chat.value
        rep.resume_completions = override or t.resume_completions.value
        rep.load_signal, rep.kv_signal = t.load_signal, t.kv_signal

    async def poll_once(self, rep: Replica) -> None:
        assert self._session is not None
        sent_s = time.monotonic()
        probe = self.probe_for(rep)
        try:
            report = await probe.poll(self._session, rep.url)
            if rep.kind != probe.kind:  # auto: detected just now
                self._apply_kind(rep, probe)
        except ProbeError as e:
            self._miss(rep, str(e))
            return
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
        served = getattr(probe, "served_models", None)
        self._ok(rep, report, served() if served is not None else [])

    def _ok(self, rep: Replica, report, served: list[str] | None = None) -> None:  # type: ignore[no-untyped-def]
        rep.last_heartbeat_s = time.monotonic()
        rep.last_heartbeat_error = ""
        rep.num_consecutive_misses = 0
        rep.num_consecutive_successes += 1
        self.replicas.set_report(rep, report, served or ())
        if report.status == "draining":
            self.replicas.set_state(rep, ReplicaState.DRAINING, "it reports draining")
        elif report.status == "loading":
            self.replicas.set_state(rep, ReplicaState.UNHEALTHY, "it reports loading")
        elif rep.num_consecutive_successes >= self.config.healthy_after_successes:
            self.replicas.set_state(rep, ReplicaState.HEALTHY, f"heartbeats answer ({rep.kind})")

    def _miss(self, rep: Replica, reason: str) -> None:
        rep.last_heartbeat_error = reason
        rep.num_consecutive_successes = 0
        rep.num_consecutive_misses += 1
        if rep.num_consecutive_misses >= self.config.unhealthy_after_misses:
            self.replicas.set_state(rep, ReplicaState.UNHEALTHY,
                                    f"{rep.num_consecutive_misses} heartbeats missed: {reason}")
        elif rep.num_consecutive_misses >= self.config.suspect_after_misses and rep.state is ReplicaState.HEALTHY:
            self.replicas.set_state(rep, ReplicaState.SUSPECT, f"heartbeat missed: {reason}")

    def _down(self, rep: Replica, reason: str) -> None:
        rep.last_heartbeat_error = reason
        rep.num_consecutive_successes = 0
        rep.num_consecutive_misses = max(rep.num_consecutive_misses + 1, self.config.unhealthy_after_misses)
        self.replicas.set_state(rep, ReplicaState.UNHEALTHY, reason)

    def mark_suspect(self, rep: Replica, reason: str) -> None:
        """The request path could not reach ``rep``: out of rotation until a heartbeat answers."""
        rep.last_heartbeat_error = reason
        rep.num_consecutive_successes = 0
        if rep.state is ReplicaState.HEALTHY:
            self.replicas.set_state(rep, ReplicaState.SUSPECT, f"a request could not reach it: {reason}")
