"""The supervisor over a local :class:`~unbroken.launcher.Stack`: one program per replica, one per
kvsync sidecar, one per gateway process and the zygote (``replicas.zygote``). A replica restarts on its own port
(``Stack.restart_replica``), so the gateway's heartbeat finds it there and takes it back (as the
standby when a standby was promoted in its place). A gateway restarts on its own port too
(``Stack.restart_gateway``): clients of ``unbroken.client`` moved to another gateway meanwhile, and
the restarted one reads the shared state (placements, drains, streams) from Redis."""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from unbroken.supervisor.metrics import SupervisorMetrics
from unbroken.supervisor.runner import Supervisor, SupervisorEvent


class Stack(Protocol):
    """What the supervisor needs of :class:`unbroken.launcher.Stack` (which imports this module,
    so it is described here rather than imported)."""

    config: Any  # has .supervisor: SupervisorSection
    replicas: Sequence[Any]  # ReplicaHandle: replica_id, process, kvsync, direct_url

    def replica(self, which: int | str) -> Any: ...

    def restart_replica(self, which: int | str, wait: bool = True) -> Any: ...

    def restart_kvsync(self, which: int | str) -> None: ...

    gateways: Sequence[Any]  # ManagedProcess, one per gateway process (``--gateways N``)
    gateway_ports: Sequence[int]

    def restart_gateway(self, wait: bool = True, index: int = 0) -> None: ...

    zygote: Any  # ManagedProcess or None (replicas.zygote)

    @property
    def zygote_refused(self) -> bool: ...

    def restart_zygote(self) -> None: ...


class ReplicaTarget:
    def __init__(self, stack: "Stack", replica_id: str) -> None:
        self.stack = stack
        self.name = replica_id

    def alive(self) -> bool:
        return self.stack.replica(self.name).process.alive()

    def health_url(self) -> str | None:
        return self.stack.replica(self.name).direct_url + "/health"

    def note(self) -> str | None:
        return None

    def kill(self) -> None:
        self.stack.replica(self.name).process.kill()

    def start(self) -> str | None:
        if not self.alive():  # someone (a test, a fault's heal) may have started it already
            return str(self.stack.restart_replica(self.name, wait=False).process.started_via)
        return None


class KVSyncTarget:
    def __init__(self, stack: "Stack", replica_id: str) -> None:
        self.stack = stack
        self.replica_id = replica_id
        self.name = f"kvsync-{replica_id}"

    def _proc(self):  # type: ignore[no-untyped-def]
        return self.stack.replica(self.replica_id).kvsync

    def alive(self) -> bool:
        p = self._proc()
        return p is not None and p.alive()

    def health_url(self) -> str | None:
        p = self._proc()
        return p.ready_url if p is not None else None

    def note(self) -> str | None:
        return None

    def kill(self) -> None:
        p = self._proc()
        if p is not None:
            p.kill()

    def start(self) -> str | None:
        self.stack.restart_kvsync(self.replica_id)
        return None


class GatewayTarget:
    """Gateway process ``index``, probed at ``/healthz`` (liveness: ``/readyz`` is 503 while no
    replica is ready, which is no reason to restart a gateway)."""

    def __init__(self, stack: "Stack", index: int) -> None:
        self.stack = stack
        self.index = index
        self.name = "gateway" if index == 0 else f"gateway-{index}"

    def alive(self) -> bool:
        return self.stack.gateways[self.index].alive()

    def health_url(self) -> str | None:
        return f"http://127.0.0.1:{self.stack.gateway_ports[self.index]}/healthz"

    def note(self) -> str | None:
        return None

    def kill(self) -> None:
        self.stack.gateways[self.index].kill()

    def start(self) -> str | None:
        if not self.alive():  # a fault's heal may have started it already
            self.stack.restart_gateway(wait=False, index=self.index)
        return None


class ZygoteTarget:
    """The zygote (``replicas.zygote``), healthy while alive (a replica start falls back to a plain
    one until it listens). One that refused to fork (status 3: CUDA, threads) counts as alive: it is
    not restarted, and replicas start plainly."""

    name = "zygote"

    def __init__(self, stack: "Stack") -> None:
        self.stack = stack

    def alive(self) -> bool:
        return self.stack.zygote.alive() or self.stack.zygote_refused

    def health_url(self) -> str | None:
        return None

    def note(self) -> str | None:
        """Why a zygote shown ``running`` has no process: it refused (status 3)."""
        if self.stack.zygote_refused:
            return "refused to fork here (threads or CUDA, status 3): replicas start plainly"
        return None

    def kill(self) -> None:
        self.stack.zygote.kill()

    def start(self) -> str | None:
        if not self.alive():
            self.stack.restart_zygote()
        return None


def supervise_stack(stack: "Stack", on_event: Callable[[SupervisorEvent], None] | None = None) -> Supervisor:
    """Start supervising every replica and sidecar of a started stack."""
    targets: list = []  # type: ignore[type-arg]
    for r in stack.replicas:
        targets.append(ReplicaTarget(stack, r.replica_id))
        if r.kvsync is not None:
            targets.append(KVSyncTarget(stack, r.replica_id))
    targets += [GatewayTarget(stack, i) for i in range(len(stack.gateways))]
    if stack.zygote is not None:
        targets.append(ZygoteTarget(stack))
    return Supervisor(stack.config.supervisor, targets, metrics=SupervisorMetrics(), on_event=on_event).start()
