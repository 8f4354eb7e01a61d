"""Chaos scenarios: YAML files in ``configs/scenarios/`` that say what fault, when, and for how long,
and the runner that plays one against a :class:`~loadtest.faults.FaultInjector`.

A scenario file::

    name: kill_replica
    description: kill -9 a replica under load, restart it later
    duration_s: 30            # the whole run (load included)
    load: {users: 4, spawn_rate: 4}
    faults:
      - {at_s: 8, action: kill_replica, target: r0, duration_s: 12}   # restarted 12 s later
    expect: {max_detection_s: 0.3}

``duration_s`` of a fault is how long it lasts before it is healed (a killed replica is
restarted, a stopped one continued, a proxy cleared, Redis restarted); 0 = healed at the end of
the run. ``python -m loadtest.chaos --duration-s N`` stretches every time in the file by
``N / duration_s``.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal

import orjson
import urllib.request
import urllib.error
import yaml
from pydantic import Field, model_validator

from loadtest.faultproxy import FaultSpec
from loadtest.faults import FaultInjector, FaultRecord
from unbroken.config import ConfigError, Section

log = logging.getLogger(__name__)

Action = Literal["kill_replica", "stop_replica", "proxy_fault", "reset_connections", "kill_redis",
                 "restart_gateway", "kill_kvsync", "crash_loop", "kill_gateway"]

# kill_gateway waits at most this long for a stream running through the gateway it kills.
KILL_GATEWAY_STREAM_WAIT_S = 10.0

# Faults after which the gateway must mark the target replica unhealthy (detection is timed).
DETECTED_ACTIONS = {"kill_replica", "stop_replica", "crash_loop"}


class FaultStep(Section):
    """One fault in a scenario."""

    action: Action = Field(description="What to do.")
    at_s: float = Field(ge=0, description="When, in seconds after the load started.")
    target: str = Field("r0", description="Replica id (r0, r1, ...), or redis / gateway (gateway-1, ... with "
                                          "several gateways).")
    duration_s: float = Field(0.0, ge=0, description="How long the fault lasts before it is healed "
                                                     "(0 = until the end of the run).")
    proxy: dict[str, Any] = Field(default_factory=dict, description="FaultSpec fields for proxy_fault "
                                                                     "(latency_ms, stall, blackhole, ...).")

    @model_validator(mode="after")
    def _check(self) -> "FaultStep":
        if self.action == "proxy_fault":
            if not self.proxy:
                raise ValueError("proxy_fault needs a 'proxy' mapping of FaultSpec fields")
            FaultSpec(**self.proxy)  # raises on unknown fields or bad values
        elif self.proxy:
            raise ValueError(f"'proxy' is only for proxy_fault, not {self.action}")
        if self.action in ("kill_redis",) and self.target not in ("r0", "redis"):
            raise ValueError("kill_redis targets redis")
        return self

    @property
    def detected(self) -> bool:
        """Whether the gateway must notice this fault (and its detection is timed)."""
        if self.action in DETECTED_ACTIONS:
            return True
        if self.action == "proxy_fault":
            spec = FaultSpec(**self.proxy)
            return spec.stall or spec.blackhole or spec.refuse
        return False


class LoadSpec(Section):
    users: int = Field(4, ge=1, description="Concurrent Locust users.")
    spawn_rate: float = Field(4.0, gt=0, description="Users started per second.")
    wait_s: float = Field(0.1, ge=0, description="Pause between a user's requests, in seconds.")
    max_tokens: int = Field(24, gt=0, description="Completion tokens per request.")
    session_fraction: float = Field(0.5, ge=0, le=1, description="Share of users that hold multi-turn sessions.")
    stream_fraction: float = Field(0.7, ge=0, le=1, description="Share of requests that stream.")


class Expectations(Section):
    max_failed_requests: int = Field(0, ge=0, description="Failed requests allowed.")
    max_detection_s: float | None = Field(None, gt=0, description="Detection bound for detected faults.")
    max_client_retries: int | None = Field(None, ge=0, description="Requests the client had to send again "
                                                                   "because the connection failed before any "
                                                                   "response (None = no bound).")


class Scenario(Section):
    name: str
    description: str = ""
    duration_s: float = Field(30.0, gt=0, description="The whole run, in seconds.")
    warmup_s: float = Field(3.0, ge=0, description="Load before the steady-state window is measured.")
    needs_fault_proxy: bool = Field(False, description="Start the stack with a proxy before each replica.")
    num_gateways: int = Field(1, ge=1, le=16, description="Gateway processes the stack runs (shared Redis); the "
                                                          "load's clients know all of them and reconnect across.")
    load: LoadSpec = Field(default_factory=LoadSpec)
    faults: list[FaultStep] = Field(default_factory=list)
    expect: Expectations = Field(default_factory=Expectations)

    @model_validator(mode="after")
    def _check(self) -> "Scenario":
        for f in self.faults:
            if f.at_s >= self.duration_s:
                raise ValueError(f"fault {f.action} at_s={f.at_s} is not before duration_s={self.duration_s}")
            if f.action in ("proxy_fault", "reset_connections") and not self.needs_fault_proxy:
                raise ValueError(f"{f.action} needs 'needs_fault_proxy: true'")
            if f.action == "kill_gateway" and self.num_gateways < 2:
                raise ValueError("kill_gateway needs 'num_gateways: 2' or more (clients move to another)")
        return self

    def scaled(self, duration_s: float | None) -> "Scenario":
        """The same scenario stretched (or shrunk) to ``duration_s``."""
        if not duration_s or duration_s == self.duration_s:
            return self
        k = duration_s / self.duration_s
        faults = [f.model_copy(update={"at_s": f.at_s * k, "duration_s": f.duration_s * k}) for f in self.faults]
        return self.model_copy(update={"duration_s": duration_s, "faults": faults,
                                       "warmup_s": min(self.warmup_s * k, self.warmup_s * 3)})


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read scenario {p}: {e}") from None
    try:
        return Scenario.model_validate(data or {})
    except Exception as e:  # pydantic's error names the field
        raise ConfigError(f"invalid scenario {p}: {e}") from None


# -- detection -------------------------------------------------------------------------------------

def _replica_entries(payload: Any) -> list[dict[str, Any]]:
    if isinstance(payload, dict):
        for key in ("replicas", "data", "items"):
            if isinstance(payload.get(key), list):
                return [e for e in payload[key] if isinstance(e, dict)]
        if all(isinstance(v, dict) for v in payload.values()):
            return [dict(v, replica_id=v.get("replica_id", k)) for k, v in payload.items()]
    if isinstance(payload, list):
        return [e for e in payload if isinstance(e, dict)]
    return []


_UNHEALTHY_WORDS = {"unhealthy", "down", "dead", "failed", "open", "suspect", "stalled", "hung", "unreachable",
                    "ejected", "removed", "draining"}


def replica_healthy(entry: dict[str, Any]) -> bool:
    """Read one replica entry of the gateway's ``GET /admin/replicas`` (tolerant of field names)."""
    for key in ("healthy", "routable", "available", "alive"):
        if isinstance(entry.get(key), bool):
            return bool(entry[key])
    for key in ("health", "state", "status", "breaker", "circuit"):
        v = entry.get(key)
        if isinstance(v, str) and v.lower() in _UNHEALTHY_WORDS:
            return False
    return True


def _admin_replicas(gateway_url: str, timeout_s: float, admin_key: str) -> Any:
    """The gateway's ``/admin/replicas`` body; None when unreachable."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(gateway_url + "/admin/replicas", headers=headers),
                                    timeout=timeout_s) as r:
            return orjson.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def gateway_replica_health(gateway_url: str, timeout_s: float = 0.5,
                           admin_key: str = "") -> dict[str, bool] | None:
    """``{replica id or url: healthy}`` from the gateway's admin view; None when unreachable."""
    payload = _admin_replicas(gateway_url, timeout_s, admin_key)
    if payload is None:
        return None
    out: dict[str, bool] = {}
    for e in _replica_entries(payload):
        healthy = replica_healthy(e)
        for key in ("replica_id", "id", "name", "url"):
            if isinstance(e.get(key), str) and e[key]:
                out[e[key].rstrip("/")] = healthy
    return out


def gateway_capacity(gateway_url: str, timeout_s: float = 0.5, admin_key: str = "") -> int | None:
    """Replicas in rotation (state ``healthy``) by the gateway's admin view; None when unreachable."""
    payload = _admin_replicas(gateway_url, timeout_s, admin_key)
    if payload is None:
        return None
    return sum(1 for e in _replica_entries(payload) if str(e.get("state", "")).lower() == "healthy")


def watch_detection(gateway_url: str, names: list[str], rec: FaultRecord, timeout_s: float = 10.0,
                    interval_s: float = 0.02, full_capacity: int | None = None,
                    recovery_timeout_s: float = 120.0, admin_key: str = "") -> None:
    """Poll the gateway until any of ``names`` is reported unhealthy; set ``rec.detected_at_s``.
    With ``full_capacity`` (the rotation's size before the fault), keep polling until the rotation
    is that size again and set ``rec.recovered_at_s`` (time to full capacity)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = gateway_replica_health(gateway_url, admin_key=admin_key)
        if health is not None and any(health.get(n.rstrip("/")) is False for n in names):
            rec.detected_at_s = time.time()
            break
        time.sleep(interval_s)
    if rec.detected_at_s is None or not full_capacity:
        return
    deadline = time.monotonic() + recovery_timeout_s
    while time.monotonic() < deadline:
        n = gateway_capacity(gateway_url, admin_key=admin_key)
        if n is not None and n >= full_capacity:
            rec.recovered_at_s = time.time()
            return
        time.sleep(interval_s)


# -- the runner ------------------------------------------------------------------------------------

class ScenarioRunner:
    """Plays a scenario's faults on a thread: apply at ``at_s``, heal after ``duration_s``, time
    detection. ``t0`` is the wall-clock start of the load (``time.time()``)."""

    def __init__(self, scenario: Scenario, injector: FaultInjector, gateway_url: str | None = None,
                 on_event: Callable[[str, FaultStep], None] | None = None) -> None:
        self.scenario = scenario
        self.injector = injector
        self.gateway_url = gateway_url
        self.on_event = on_event or (lambda *_: None)
        self.errors: list[str] = []
        self.step_records: list[tuple[FaultStep, FaultRecord | None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchers: list[threading.Thread] = []

    def start(self, t0: float | None = None) -> "ScenarioRunner":
        self.t0 = t0 or time.time()
        self._thread = threading.Thread(target=self._run, name="scenario", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop playing, heal whatever is still faulted and wait for detection watchers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        self.injector.heal()
        deadline = time.monotonic() + 120
        for w in self._watchers:  # a detection is done in seconds; time to full capacity may take a reload
            w.join(timeout=max(0.1, deadline - time.monotonic()))

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        events: list[tuple[float, int, str, FaultStep]] = []
        for i, step in enumerate(self.scenario.faults):
            heapq.heappush(events, (step.at_s, i, "apply", step))
        while events and not self._stop.is_set():
            at_s, i, kind, step = heapq.heappop(events)
            if self._stop.wait(max(0.0, self.t0 + at_s - time.time())):
                return
            try:
                if kind == "apply":
                    self._apply(step)
                    if step.duration_s > 0:
                        heapq.heappush(events, (at_s + step.duration_s, i, "heal", step))
                else:
                    self._heal(step)
                self.on_event(kind, step)
            except Exception as e:  # noqa: BLE001 - a scenario error is reported, not raised on a thread
                log.exception("scenario step %s %s failed", kind, step.action)
                self.errors.append(f"{kind} {step.action} on {step.target}: {e}")

    def _apply(self, step: FaultStep) -> None:
        inj = self.injector
        rec: FaultRecord | None
        capacity = (gateway_capacity(self.gateway_url, admin_key=inj.stack.admin_key)
                    if self.gateway_url and step.detected else None)
        if step.action == "kill_replica":
            rec = inj.kill_replica(step.target)
        elif step.action == "stop_replica":
            rec = inj.stop_replica(step.target)
        elif step.action == "crash_loop":
            rec = inj.crash_loop(step.target)
        elif step.action == "proxy_fault":
            rec = inj.proxy_fault(step.target, FaultSpec(**step.proxy))
        elif step.action == "reset_connections":
            inj.reset_connections(step.target)
            rec = inj.records[-1]
        elif step.action == "kill_redis":
            rec = inj.kill_redis()
        elif step.action == "kill_kvsync":
            rec = inj.kill_kvsync(step.target)
        elif step.action == "restart_gateway":
            rec = inj.restart_gateway()
        elif step.action == "kill_gateway":
            # The scenario is about streams cut mid-way: wait (bounded) until the gateway relays one.
            rec = inj.kill_gateway(step.target, wait_for_stream_s=KILL_GATEWAY_STREAM_WAIT_S)
        else:  # pragma: no cover - the Literal type keeps this out
            raise ValueError(step.action)
        self.step_records.append((step, rec))
        if step.detected and self.gateway_url and rec is not None:
            r = inj.stack.replica(step.target)
            names = [r.replica_id, r.url, r.direct_url]
            w = threading.Thread(target=watch_detection, args=(self.gateway_url, names, rec), daemon=True,
                                 kwargs={"full_capacity": capacity, "admin_key": inj.stack.admin_key})
            w.start()
            self._watchers.append(w)

    def _heal(self, step: FaultStep) -> None:
        inj = self.injector
        if step.action == "kill_replica":
            inj.heal_kill(step.target, wait=False)
        elif step.action == "stop_replica":
            inj.cont_replica(step.target)
        elif step.action == "crash_loop":
            inj.heal_crash_loop(step.target)
        elif step.action == "proxy_fault":
            inj.clear_proxy(step.target)
        elif step.action == "kill_redis":
            inj.restart_redis()
        else:
            for rec in inj.active():
                if rec.action == step.action and rec.target == step.target:
                    inj.heal_one(rec, wait=False)
