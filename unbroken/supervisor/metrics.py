"""The supervisor's Prometheus metrics (prefix ``unbroken_supervisor_``), one registry per supervisor.

``unbroken supervise`` serves them on ``metrics_port`` (loopback); ``unbroken up`` on
``--supervisor-metrics-port``. Program states are read at scrape time.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from unbroken.supervisor.policy import ProgramState

PREFIX = "unbroken_supervisor_"


class _StateCollector(Collector):
    def __init__(self, states: Callable[[], dict[str, ProgramState]]) -> None:
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(PREFIX + "program_state", "1 for the program's current state, 0 for the others.",
                              labels=["program", "state"])
        for name, state in self._states().items():
            for s in ProgramState:
                g.add_metric([name, s.value], 1.0 if s is state else 0.0)
        yield g


class SupervisorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.failures = Counter(PREFIX + "failures", "Programs that exited, never became ready, or stayed "
                                "unhealthy, by program and reason.", ["program", "reason"], registry=r)
        self.restarts = Counter(PREFIX + "restarts", "Programs started again by the supervisor.", ["program"],
                                registry=r)
        self.starts = Counter(PREFIX + "starts", "Restarts by the way they went: forked by the zygote, or a plain "
                              "start (no zygote, not ready, or it refused).", ["program", "via"], registry=r)
        self.crash_loops = Counter(PREFIX + "crash_loops", "Programs left down after too many failures.",
                                   ["program"], registry=r)

    def attach_states(self, states: Callable[[], dict[str, ProgramState]]) -> None:
        self.registry.register(_StateCollector(states))

    def render(self) -> bytes:
        return generate_latest(self.registry)
