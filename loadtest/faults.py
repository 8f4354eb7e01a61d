"""The fault injector: every fault the chaos suite and the scenario runner inject, on one stack.

Faults only ever reach processes that the :class:`~unbroken.launcher.Stack` itself started (its
own children, checked by pid and parent pid) and loopback ports (through
:mod:`loadtest.faultproxy`, which refuses anything else). Every fault is recorded with wall-clock
start and end times so reports can mark it.

    injector = FaultInjector(stack)
    injector.kill_replica("r0")            # kill -9
    injector.stop_replica("r1")            # SIGSTOP (a hang) ... injector.cont_replica("r1")
    injector.proxy_fault("r1", latency_ms=300)   # needs fault_proxy.enabled in the stack
    injector.kill_redis(); injector.restart_redis()
    injector.restart_gateway()
    injector.heal()                        # undo every fault still active
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.faultproxy import FaultSafetyError, FaultSpec, require_loopback
from unbroken.launcher import ReplicaHandle, Stack
from unbroken.procs import ManagedProcess
from unbroken.zygote import ZygoteChild

log = logging.getLogger(__name__)

__all__ = ["FaultInjector", "FaultRecord", "FaultSafetyError"]


@dataclass
class FaultRecord:
    """One injected fault: what, on which target, from when to when (wall clock, seconds)."""

    action: str
    target: str
    started_at_s: float
    ended_at_s: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    detected_at_s: float | None = None
    """When the gateway first reported the target unhealthy (None = not measured or never)."""
    recovered_at_s: float | None = None
    """When the gateway's rotation was back to its size before the fault (None = not measured or never)."""

    @property
    def detection_s(self) -> float | None:
        if self.detected_at_s is None:
            return None
        return self.detected_at_s - self.started_at_s

    @property
    def mttr_s(self) -> float | None:
        """Time to full capacity: from the fault to the rotation's full size again."""
        if self.recovered_at_s is None:
            return None
        return self.recovered_at_s - self.started_at_s

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "target": self.target, "started_at_s": self.started_at_s,
                "ended_at_s": self.ended_at_s, "params": self.params, "detected_at_s": self.detected_at_s,
                "detection_s": self.detection_s, "recovered_at_s": self.recovered_at_s,
                "mttr_s": self.mttr_s}


def _parent_pid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class FaultInjector:
    """Injects faults into one :class:`Stack`'s own processes and proxies, and records them."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.records: list[FaultRecord] = []
        self._active: dict[tuple[str, str], FaultRecord] = {}
        self._lock = threading.Lock()

    # -- safety ----------------------------------------------------------------------------------

    def _check_owned(self, proc: ManagedProcess | None, what: str) -> ManagedProcess:
        """Refuse any process the stack did not start, or that is no longer its child (or its zygote's)."""
        if proc is None or proc.proc is None:
            raise FaultSafetyError(f"refusing fault on {what}: the stack did not start it")
        if not any(proc is p for p in self.stack.processes()) or proc.pid not in self.stack.owned_pids():
            raise FaultSafetyError(f"refusing fault on {what}: pid {proc.pid} is not owned by the stack")
        if proc.alive() and _parent_pid(proc.pid) != os.getpid() and not self._forked_by_our_zygote(proc):
            raise FaultSafetyError(f"refusing fault on {what}: pid {proc.pid} is not a child of this process "
                                   "(nor one the stack's zygote forked)")
        return proc

    @staticmethod
    def _forked_by_our_zygote(proc: ManagedProcess) -> bool:
        """A replica forked by the stack's zygote is the zygote's child, not ours; it is held through a
        pidfd, so a signal reaches exactly it (never a reused pid), and the checks above made sure the
        stack started it."""
        return isinstance(proc.proc, ZygoteChild)

    def _signal(self, proc: ManagedProcess, sig: int, what: str) -> None:
        self._check_owned(proc, what)
        proc.signal(sig)

    # -- records ---------------------------------------------------------------------------------

    def _begin(self, action: str, target: str, **params: Any) -> FaultRecord:
        rec = FaultRecord(action=action, target=target, started_at_s=time.time(), params=params)
        with self._lock:
            self.records.append(rec)
            self._active[(action, target)] = rec
        log.info("fault %s on %s %s", action, target, params or "")
        return rec

    def _end(self, action: str, target: str) -> FaultRecord | None:
        with self._lock:
            rec = self._active.pop((action, target), None)
        if rec is not None:
            rec.ended_at_s = time.time()
        return rec

    def active(self) -> list[FaultRecord]:
        with self._lock:
            return list(self._active.values())

    # -- replicas --------------------------------------------------------------------------------

    def _replica(self, which: int | str) -> ReplicaHandle:
        return self.stack.replica(which)

    def kill_replica(self, which: int | str) -> FaultRecord:
        """kill -9 the replica (its sidecar keeps running)."""
        r = self._replica(which)
        proc = self._check_owned(r.process, r.replica_id)
        rec = self._begin("kill_replica", r.replica_id)
        proc.kill()
        return rec

    def restart_replica(self, which: int | str, wait: bool = True) -> ReplicaHandle:
        """Start a killed (or running) replica again on its port; ends its kill record."""
        r = self._replica(which)
        self._check_owned(r.process, r.replica_id)
        handle = self.stack.restart_replica(r.replica_id, wait=wait)
        self._end("kill_replica", r.replica_id)
        return handle

    def heal_kill(self, which: int | str, wait: bool = True) -> None:
        """End a kill: start the replica again unless it runs already (its supervisor restarted it)."""
        r = self._replica(which)
        if r.process.alive():
            self._end("kill_replica", r.replica_id)
        else:
            self.restart_replica(which, wait=wait)

    def crash_loop(self, which: int | str) -> FaultRecord:
        """Make the replica die at every start (its checkpoint path points at a missing directory)
        and kill -9 it: restarts fail until :meth:`heal_crash_loop`."""
        r = self._replica(which)
        proc = self._check_owned(r.process, r.replica_id)
        rec = self._begin("crash_loop", r.replica_id)
        r.model_path_override = str((self.stack.run_dir / f"missing-model-{r.replica_id}").resolve())
        proc.kill()
        return rec

    def heal_crash_loop(self, which: int | str, wait: bool = False) -> None:
        """The checkpoint is back: the supervisor forgets the failures and starts it (or we do)."""
        r = self._replica(which)
        r.model_path_override = ""
        sup = self.stack.supervisor
        if sup is not None and r.replica_id in sup.policies:
            sup.reset(r.replica_id)
        elif not r.process.alive():
            self.stack.restart_replica(r.replica_id, wait=wait)
        self._end("crash_loop", r.replica_id)

    def stop_replica(self, which: int | str) -> FaultRecord:
        """SIGSTOP: the replica hangs with its sockets open."""
        r = self._replica(which)
        rec = self._begin("stop_replica", r.replica_id)
        self._signal(r.process, signal.SIGSTOP, r.replica_id)
        return rec

    def cont_replica(self, which: int | str) -> None:
        r = self._replica(which)
        self._signal(r.process, signal.SIGCONT, r.replica_id)
        self._end("stop_replica", r.replica_id)

    def kill_kvsync(self, which: int | str) -> FaultRecord:
        r = self._replica(which)
        proc = self._check_owned(r.kvsync, f"kvsync of {r.replica_id}")
        rec = self._begin("kill_kvsync", r.replica_id)
        proc.kill()
        return rec

    # -- the network between gateway and replica ---------------------------------------------------

    def proxy_fault(self, which: int | str, spec: FaultSpec | None = None, **fields: Any) -> FaultRecord:
        """Set a fault on the proxy in front of a replica (latency, stall, blackhole, errors ...)."""
        r = self._replica(which)
        if r.proxy is None:
            raise RuntimeError(f"replica {r.replica_id} has no fault proxy: start the stack with "
                               "fault_proxy.enabled (unbroken up --fault-proxies)")
        require_loopback(r.proxy.target_host)
        applied = r.proxy.set_fault(spec, **fields)
        params = {k: v for k, v in applied.__dict__.items() if v != FaultSpec().__dict__[k]}
        self._end("proxy_fault", r.replica_id)
        return self._begin("proxy_fault", r.replica_id, **params)

    def reset_connections(self, which: int | str) -> int:
        """Cut (RST) every open gateway->replica connection of one replica's proxy right now."""
        r = self._replica(which)
        if r.proxy is None:
            raise RuntimeError(f"replica {r.replica_id} has no fault proxy")
        rec = self._begin("reset_connections", r.replica_id)
        n = r.proxy.reset_connections()
        self._end("reset_connections", r.replica_id)
        rec.params["num_connections"] = n
        return n

    def clear_proxy(self, which: int | str) -> None:
        r = self._replica(which)
        if r.proxy is not None:
            r.proxy.clear()
        self._end("proxy_fault", r.replica_id)

    # -- Redis and the gateway ---------------------------------------------------------------------

    def kill_redis(self) -> FaultRecord:
        proc = self._check_owned(self.stack.redis, "redis")
        rec = self._begin("kill_redis", "redis")
        proc.kill()
        return rec

    def restart_redis(self) -> None:
        self._check_owned(self.stack.redis, "redis")
        self.stack.restart_redis()
        self._end("kill_redis", "redis")

    def restart_gateway(self, wait: bool = True) -> FaultRecord:
        """SIGTERM the gateway (it drains running streams), start it again on the same port."""
        self._check_owned(self.stack.gateway, "gateway")
        rec = self._begin("restart_gateway", "gateway")
        self.stack.restart_gateway(wait=wait)
        self._end("restart_gateway", "gateway")
        return rec

    def _gateway_index(self, target: str) -> int:
        """``gateway`` / ``gateway-0`` is the first of the stack's gateways, ``gateway-1`` the second, ..."""
        name, _, num = target.partition("-")
        index = int(num) if num.isdigit() else 0
        if name != "gateway" or index >= len(self.stack.gateways):
            raise KeyError(f"no gateway {target!r} in this stack ({len(self.stack.gateways)} gateways)")
        return index

    def kill_gateway(self, target: str = "gateway", wait_for_stream_s: float = 0.0) -> FaultRecord:
        """kill -9 one gateway process: its streams break, clients reconnect to another gateway.
        ``wait_for_stream_s``: first wait (at most that long) until the gateway relays a resumable
        stream (its ``unbroken_gateway_streams_running`` gauge), so that the kill cuts one mid-stream
        rather than falling, by chance, between requests."""
        index = self._gateway_index(target)
        proc = self._check_owned(self.stack.gateways[index], target)
        params: dict[str, Any] = {}
        if wait_for_stream_s > 0:
            params["streams_running"] = wait_streams_running(self.stack.urls[index], wait_for_stream_s,
                                                             self.stack.admin_key)
        rec = self._begin("kill_gateway", target, **params)
        proc.kill()
        return rec

    def restart_killed_gateway(self, target: str = "gateway", wait: bool = True) -> None:
        index = self._gateway_index(target)
        proc = self._check_owned(self.stack.gateways[index], target)
        if proc.alive():  # the supervisor restarted it already
            if wait:
                proc.wait_ready(self.stack.config.gateway.ready_timeout_s)
        else:
            self.stack.restart_gateway(wait=wait, index=index)
        self._end("kill_gateway", target)

    # -- undo ----------------------------------------------------------------------------------------

    def heal(self, wait: bool = True) -> None:
        """Undo every fault still active: SIGCONT, clear proxies, restart what was killed."""
        for rec in self.active():
            try:
                self.heal_one(rec, wait=wait)
            except Exception:  # noqa: BLE001 - heal the rest regardless
                log.exception("could not heal %s on %s", rec.action, rec.target)

    def heal_one(self, rec: FaultRecord, wait: bool = True) -> None:
        if rec.action == "kill_replica":
            self.heal_kill(rec.target, wait=wait)
        elif rec.action == "stop_replica":
            self.cont_replica(rec.target)
        elif rec.action == "crash_loop":
            self.heal_crash_loop(rec.target, wait=wait)
        elif rec.action == "proxy_fault":
            self.clear_proxy(rec.target)
        elif rec.action == "kill_redis":
            self.restart_redis()
        elif rec.action == "kill_gateway":
            self.restart_killed_gateway(rec.target, wait=wait)
        elif rec.action == "kill_kvsync":
            r = self._replica(rec.target)
            if r.kvsync is not None and not r.kvsync.alive():
                r.kvsync = ManagedProcess(r.kvsync.name, r.kvsync.cmd, log_path=r.kvsync.log_path,
                                          ready_url=r.kvsync.ready_url).start()
            self._end("kill_kvsync", rec.target)
        else:
            self._end(rec.action, rec.target)


def metrics_text(url: str, token: str = "", timeout_s: float = 1.0) -> str | None:
    """A process's Prometheus ``/metrics`` text (``token``: the bearer token it needs there); None
    when unreachable."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + "/metrics", headers=headers),
                                    timeout=timeout_s) as r:
            return r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return None


def streams_running(gateway_url: str, admin_key: str = "", timeout_s: float = 1.0) -> int | None:
    """The gateway process's ``unbroken_gateway_streams_running`` gauge; None when unreachable."""
    text = metrics_text(gateway_url, admin_key, timeout_s)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("unbroken_gateway_streams_running "):
            try:
                return int(float(line.rpartition(" ")[2]))
            except ValueError:
                return None
    return None


def wait_streams_running(gateway_url: str, timeout_s: float, admin_key: str = "",
                         interval_s: float = 0.005) -> int:
    """Poll until the gateway relays at least one resumable stream (or ``timeout_s`` passed); the
    last count seen (0: none in time)."""
    deadline = time.monotonic() + timeout_s
    n = 0
    while True:
        n = streams_running(gateway_url, admin_key) or 0
        if n > 0 or time.monotonic() >= deadline:
            return n
        time.sleep(interval_s)
