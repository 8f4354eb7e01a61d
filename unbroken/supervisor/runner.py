"""The supervisor's I/O half: a thread that watches programs and acts on :class:`ProgramPolicy`'s
decisions. A program is anything with :class:`Target`'s methods: a process started from a
command (:class:`CommandTarget`, for ``unbroken supervise``) or a replica of a local stack
(``unbroken.supervisor.stack``)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from unbroken.procs import ManagedProcess, http_ok
from unbroken.supervisor.metrics import SupervisorMetrics
from unbroken.supervisor.policy import Decision, Observation, ProgramPolicy, ProgramState, SupervisorSection

log = logging.getLogger("unbroken.supervisor")


class Target(Protocol):
    """One supervised program."""

    name: str

    def alive(self) -> bool: ...

    def health_url(self) -> str | None: ...

    def kill(self) -> None: ...

    def start(self) -> str | None:
        """Start it (again); must not wait for it to be ready. Returns how it was started (a replica:
        ``"zygote"`` or ``"plain"``), counted in ``unbroken_supervisor_starts_total``; None = plain."""

    def note(self) -> str | None:
        """What it says of itself beyond its state, shown in the status (the zygote that refused)."""


@dataclass(frozen=True)
class SupervisorEvent:
    program: str
    kind: str  # failed | restarted | crash_loop | reset
    detail: str
    at_s: float  # time.time()


class CommandTarget:
    """A process started from a command line, probed at ``health_url``."""

    def __init__(self, name: str, cmd: Sequence[str], *, health_url: str | None = None,
                 env: Mapping[str, str] | None = None, log_path: str | Path | None = None,
                 cwd: str | Path | None = None) -> None:
        self.name = name
        self._health_url = health_url
        self.process = ManagedProcess(name, cmd, log_path=log_path, env=env, cwd=cwd)

    def alive(self) -> bool:
        return self.process.alive()

    def health_url(self) -> str | None:
        return self._health_url

    def note(self) -> str | None:
        return None

    def kill(self) -> None:
        self.process.kill()

    def start(self) -> str | None:
        self.process.start()
        return None

    def stop(self, timeout_s: float) -> None:
        self.process.stop(timeout_s)


class Supervisor:
    """Checks every program each ``check_interval_ms`` and restarts, kills or gives up as its policy
    says. Targets are expected to be started already when :meth:`start` is called."""

    def __init__(self, config: SupervisorSection, targets: Sequence[Target], *,
                 metrics: SupervisorMetrics | None = None,
                 on_event: Callable[[SupervisorEvent], None] | None = None) -> None:
        self.config = config
        self.targets = {t.name: t for t in targets}
        now = time.monotonic()
        self.policies: dict[str, ProgramPolicy] = {}
        for t in targets:
            self.policies[t.name] = ProgramPolicy(config)
            self.policies[t.name].started(now)
        self.metrics = metrics or SupervisorMetrics()
        self.metrics.attach_states(self.states)
        self.events: list[SupervisorEvent] = []
        self._last_probe: dict[str, tuple[float, bool]] = {}  # program -> (when, healthy)
        self._on_event = on_event
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def states(self) -> dict[str, ProgramState]:
        return {name: p.state for name, p in self.policies.items()}

    def status(self) -> list[dict[str, Any]]:
        """One row per program, for status output and ``supervisor.json``."""
        with self._lock:
            return [{"program": name, "state": p.state.value, "restarts": p.num_restarts,
                     "recent_failures": len(p.failures_s), "last_failure": p.last_failure or None,
                     "note": self.targets[name].note()}
                    for name, p in self.policies.items()]

    def write_status(self, path: str | Path) -> None:
        """:meth:`status` as JSON, replaced atomically (a reader never sees half a file)."""
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.status(), indent=2))
        os.replace(tmp, p)

    def start(self) -> "Supervisor":
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop supervising (the programs are left as they are)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def reset(self, name: str) -> None:
        """Forget a program's failures and start it again (after a crash loop was fixed)."""
        with self._lock:
            self.policies[name].reset(time.monotonic())
        self._event(name, "reset", "failures forgotten; starting again")

    def _probe(self, name: str, target: Target, policy: ProgramPolicy) -> bool:
        """The health probe's answer, probing at most every ``health_interval_ms`` (and afresh
        after every start)."""
        url = target.health_url()
        if url is None:
            return True
        now = time.monotonic()
        last = self._last_probe.get(name)
        fresh = last is not None and last[0] >= policy.started_at_s
        if fresh and now - last[0] < self.config.health_interval_ms / 1000:  # type: ignore[index]
            return last[1]  # type: ignore[index]
        healthy = http_ok(url, timeout_s=self.config.health_timeout_ms / 1000.0)
        self._last_probe[name] = (now, healthy)
        return healthy

    def _event(self, program: str, kind: str, detail: str) -> None:
        ev = SupervisorEvent(program, kind, detail, time.time())
        self.events.append(ev)
        (log.error if kind == "crash_loop" else log.warning)("supervisor: %s %s: %s", program, kind, detail)
        if self._on_event is not None:
            self._on_event(ev)

    def _run(self) -> None:
        interval_s = self.config.check_interval_ms / 1000.0
        while not self._stop.is_set():
            for name in list(self.targets):
                if self._stop.is_set():
                    return
                try:
                    self.check_once(name)
                except Exception:  # noqa: BLE001 - one program's trouble never stops the others
                    log.exception("supervisor: checking %s failed", name)
            self._stop.wait(interval_s)

    def check_once(self, name: str) -> Decision:
        target, policy = self.targets[name], self.policies[name]
        alive = target.alive()
        healthy = False
        if alive and policy.state in (ProgramState.STARTING, ProgramState.RUNNING):
            healthy = self._probe(name, target, policy)
        with self._lock:
            decision = policy.observe(time.monotonic(), Observation(alive=alive, healthy=healthy))
            reason = policy.last_failure
        if decision in (Decision.KILL, Decision.GIVE_UP) and alive:
            target.kill()
        if decision in (Decision.FAILED, Decision.KILL):
            self.metrics.failures.labels(name, reason).inc()
            self._event(name, "failed", f"{reason}; restart in {policy.backoff_s():.2f}s")
        elif decision is Decision.GIVE_UP:
            self.metrics.failures.labels(name, reason).inc()
            self.metrics.crash_loops.labels(name).inc()
            self._event(name, "crash_loop", f"{len(policy.failures_s)} failures within "
                        f"{self.config.crash_loop_window_s:.0f}s (last: {reason}); left down")
        elif decision is Decision.RESTART:
            via = target.start() or "plain"
            with self._lock:
                policy.started(time.monotonic())
            self.metrics.restarts.labels(name).inc()
            self.metrics.starts.labels(name, via).inc()
            self._event(name, "restarted", f"restart {policy.num_restarts} ({via})")
        return decision
