"""The replicas the gateway knows, their state, and the precomputed lists routing reads.

A :class:`Replica` is the gateway's view of one replica: where it is, what its last heartbeat said
(:class:`unbroken.contract.heartbeat.ReplicaStateReport`), its health state (set by ``health.py``), its
circuit breaker (``breaker.py``) and the gateway's own in-flight count. :class:`ReplicaSet` owns the
collection; it is mutated only on the event loop (heartbeat tasks, discovery task, admin handler)
and keeps ``routable_by_model`` precomputed so that the request path does no scanning.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import urlsplit

from gateway.breaker import BreakerState, CircuitBreaker
from gateway.config import BreakerSection
from unbroken.contract.heartbeat import ReplicaStateReport


class ReplicaState(str, enum.Enum):
    HEALTHY = "healthy"  # heartbeats answered: in rotation
    SUSPECT = "suspect"  # a heartbeat missed or a connection failed: out of rotation until one answers
    UNHEALTHY = "unhealthy"  # several misses, connection refused, or never seen
    DRAINING = "draining"  # no new work (admin drain or the replica says so); running streams finish


class ReplicaSource(str, enum.Enum):
    STATIC = "static"
    REGISTRY = "registry"


def default_replica_id(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


def split_model(model: str) -> tuple[str, str | None]:
    """``"qwen:sql"`` -> ``("qwen", "sql")``; ``"qwen"`` -> ``("qwen", None)``."""
    base, sep, adapter = model.partition(":")
    return base, (adapter if sep and adapter else None)


@dataclass(eq=False)
class Replica:
    url: str
    source: ReplicaSource = ReplicaSource.STATIC
    replica_id: str = ""
    state: ReplicaState = ReplicaState.UNHEALTHY
    report: ReplicaStateReport | None = None
    breaker: CircuitBreaker | None = None
    num_inflight: int = 0
    admin_draining: bool = False
    num_consecutive_misses: int = 0
    num_consecutive_successes: int = 0
    last_heartbeat_s: float = 0.0
    last_heartbeat_error: str = ""
    models: frozenset[str] = frozenset()
    registry_models: tuple[str, ...] = ()
    ring_token: str = ""  # stable name on the hash ring (the URL)
    extra: dict[str, Any] = field(default_factory=dict)
    # The timeouts of every wait on this replica now running (a response, a stream's next event):
    # when the replica is declared unhealthy they all expire at once, so that its in-flight work
    # moves elsewhere within the detection bound instead of after its own, longer timeout.
    waits: set[asyncio.Timeout] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.replica_id = self.replica_id or default_replica_id(self.url)
        self.ring_token = self.url

    @property
    def kv_used_fraction(self) -> float:
        r = self.report
        if r is None:
            return 0.0
        total = r.kv_bytes_used + r.kv_bytes_free
        return r.kv_bytes_used / total if total > 0 else 0.0

    def expire_waits(self) -> int:
        """Expire every running wait on this replica now (each raises TimeoutError where it waits)."""
        if not self.waits:
            return 0
        now = asyncio.get_running_loop().time()
        for cm in list(self.waits):
            cm.reschedule(now)
        return len(self.waits)

    def has_kv_headroom(self, num_prompt_tokens: int) -> bool:
        r = self.report
        if r is None or r.kv_bytes_per_token <= 0 or (r.kv_bytes_free <= 0 and r.kv_bytes_used <= 0):
            return True  # nothing reported: do not guess
        return num_prompt_tokens * r.kv_bytes_per_token <= r.kv_bytes_free

    def serves(self, model: str) -> bool:
        return model in self.models

    def to_admin_dict(self) -> dict[str, Any]:
        r = self.report
        return {
            "replica_id": self.replica_id,
            "url": self.url,
            "source": self.source.value,
            "state": self.state.value,
            "breaker": self.breaker.state.value if self.breaker else None,
            "gateway_inflight": self.num_inflight,
            "models": sorted(self.models),
            "last_heartbeat_age_s": round(time.monotonic() - self.last_heartbeat_s, 3)
            if self.last_heartbeat_s else None,
            "last_heartbeat_error": self.last_heartbeat_error or None,
            "load": None if r is None else {
                "queue_length": r.queue_length, "num_running": r.num_running, "num_waiting": r.num_waiting,
                "tokens_per_s": r.tokens_per_s, "num_preemptions": r.num_preemptions,
            },
            "memory": None if r is None else {
                "kv_bytes_used": r.kv_bytes_used, "kv_bytes_free": r.kv_bytes_free,
                "kv_bytes_per_token": r.kv_bytes_per_token,
                "device_memory_free_bytes": r.device_memory_free_bytes,
            },
            "sessions": None if r is None else len(r.sessions),
            "pid": None if r is None else r.pid,
        }


def report_from_json(data: dict[str, Any]) -> ReplicaStateReport:
    """Parse a ``/state`` body (the contract's one parser)."""
    return ReplicaStateReport.from_dict(data)


class ReplicaSet:
    """All known replicas, keyed by URL. Call :meth:`refresh` after any state change."""

    def __init__(self, breaker_config: BreakerSection) -> None:
        self._breaker_config = breaker_config
        self.by_url: dict[str, Replica] = {}
        self.routable_by_model: dict[str, list[Replica]] = {}
        self.ring_members: list[Replica] = []
        self.all_models: frozenset[str] = frozenset()
        self.default_model: str | None = None  # the base model, when exactly one is known
        self.version = 0
        self._listeners: list[Any] = []

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self.by_url.values()))

    def __len__(self) -> int:
        return len(self.by_url)

    def add_listener(self, fn: Any) -> None:
        """``fn(event: str, replica: Replica)`` on "added", "removed" and "state"."""
        self._listeners.append(fn)

    def _emit(self, event: str, replica: Replica) -> None:
        for fn in self._listeners:
            fn(event, replica)

    def add(self, url: str, source: ReplicaSource = ReplicaSource.STATIC, replica_id: str = "",
            models: Iterable[str] = ()) -> Replica:
        url = url.rstrip("/")
        existing = self.by_url.get(url)
        if existing is not None:
            if replica_id and existing.replica_id != replica_id:
                existing.replica_id = replica_id
            return existing
        rep = Replica(url=url, source=source, replica_id=replica_id,
                      breaker=CircuitBreaker(self._breaker_config))
        if models:
            rep.registry_models = tuple(models)
            rep.models = frozenset(models)
        self.by_url[url] = rep
        self.refresh()
        self._emit("added", rep)
        return rep

    def remove(self, url: str) -> Replica | None:
        rep = self.by_url.pop(url.rstrip("/"), None)
        if rep is not None:
            self.refresh()
            self._emit("removed", rep)
        return rep

    def find(self, replica_id_or_url: str) -> Replica | None:
        key = replica_id_or_url.rstrip("/")
        if key in self.by_url:
            return self.by_url[key]
        for rep in self.by_url.values():
            if rep.replica_id == key:
                return rep
        return None

    def set_state(self, rep: Replica, state: ReplicaState) -> None:
        if rep.admin_draining:
            state = ReplicaState.DRAINING
        if rep.state is not state:
            rep.state = state
            self.refresh()
            self._emit("state", rep)
            if state is ReplicaState.UNHEALTHY:
                self._move_work_off(rep)
            elif state is ReplicaState.HEALTHY:
                for other in self.by_url.values():
                    if other.state is ReplicaState.UNHEALTHY and other.waits:
                        self._move_work_off(other)

    def _move_work_off(self, rep: Replica) -> None:
        """Expire the waits on an unhealthy replica, but only when another replica in rotation
        (healthy, breaker not open) serves one of its models: with nowhere to go, work on a hung
        replica had better wait for it (its own stall timeout still applies) than fail."""
        for m in rep.models:
            for other in self.routable_by_model.get(m) or ():
                if other is not rep and (other.breaker is None or other.breaker.state is not BreakerState.OPEN):
                    rep.expire_waits()
                    return

    def set_report(self, rep: Replica, report: ReplicaStateReport) -> None:
        rep.report = report
        if report.replica_id and report.replica_id != rep.replica_id:
            rep.replica_id = report.replica_id
        models = frozenset([report.model, *(f"{report.model}:{a}" for a in report.adapters)]) if report.model \
            else frozenset(rep.registry_models)
        if models != rep.models:
            rep.models = models
            self.refresh()

    def refresh(self) -> None:
        """Recompute the per-model lists of replicas in rotation (health only; breakers are
        checked per request because they change with time)."""
        by_model: dict[str, list[Replica]] = {}
        for rep in self.by_url.values():
            if rep.state is ReplicaState.HEALTHY:
                for m in rep.models:
                    by_model.setdefault(m, []).append(rep)
        self.routable_by_model = by_model
        self.ring_members = sorted(self.by_url.values(), key=lambda r: r.ring_token)
        models: set[str] = set()
        for rep in self.by_url.values():
            models |= rep.models
        self.all_models = frozenset(models)
        bases = {m for m in models if ":" not in m}
        self.default_model = next(iter(bases)) if len(bases) == 1 else None
        self.version += 1

    def known_models(self) -> frozenset[str]:
        return self.all_models

    def num_healthy(self) -> int:
        return sum(1 for r in self.by_url.values() if r.state is ReplicaState.HEALTHY)

    def candidates(self, model: str, exclude: Iterable[Replica] = ()) -> list[Replica]:
        """Replicas in rotation for ``model``: healthy by heartbeat AND allowed by their breaker.
        This is the one place where the two are combined."""
        reps = self.routable_by_model.get(model)
        if not reps:
            return []
        ex = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
        return [r for r in reps if r not in ex and (r.breaker is None or r.breaker.allows_request())]

    def breaker_open(self, rep: Replica) -> bool:
        return rep.breaker is not None and rep.breaker.state is not BreakerState.CLOSED
