"""The supervisor's decisions for one program, as a pure state machine (no processes, no clock).

Each tick the runner tells :meth:`ProgramPolicy.observe` what it sees (is the process alive, does its
health URL answer) and does what the returned :class:`Decision` says. A failure is the process
exiting, not becoming healthy within ``start_timeout_s`` of a start, or staying unhealthy for
``unhealthy_after_s`` after it was healthy. After a failure the program waits
``backoff_initial_s * backoff_multiplier ** (failures in the window - 1)`` (at most
``backoff_max_s``) and is started again; ``crash_loop_failures`` failures within
``crash_loop_window_s`` and it is left down (CRASH_LOOP) until :meth:`ProgramPolicy.reset`.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from pydantic import Field, model_validator

from unbroken.config import Section


class SupervisorSection(Section):
    """How the supervisor judges and restarts a program."""

    enabled: bool = Field(True, description="Supervise (restart) the replicas and sidecars.")
    check_interval_ms: int = Field(200, gt=0, description="How often each program's process is checked "
                                                          "(alive or exited: no I/O).")
    health_interval_ms: int = Field(1000, gt=0, description="How often each live program's health URL is "
                                                            "probed (an HTTP request).")
    health_timeout_ms: int = Field(1000, gt=0, description="Timeout of one health probe.")
    start_timeout_s: float = Field(240.0, gt=0, description="A started program that is not healthy within "
                                                            "this long has failed (covers model loading).")
    unhealthy_after_s: float = Field(10.0, gt=0, description="A program that was healthy and then fails its "
                                                             "health probe for this long is killed and "
                                                             "restarted.")
    backoff_initial_s: float = Field(0.25, ge=0, description="Wait before the restart after a first failure.")
    backoff_multiplier: float = Field(2.0, ge=1, description="Growth of the wait per further failure in the "
                                                             "crash-loop window.")
    backoff_max_s: float = Field(30.0, ge=0, description="Longest wait before a restart.")
    crash_loop_failures: int = Field(5, ge=1, description="This many failures within crash_loop_window_s and "
                                                          "the program is left down and reported.")
    crash_loop_window_s: float = Field(120.0, gt=0, description="Window the crash-loop failures are counted in.")

    @model_validator(mode="after")
    def _check(self) -> "SupervisorSection":
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self


class ProgramState(str, enum.Enum):
    STARTING = "starting"  # started, not yet healthy
    RUNNING = "running"  # healthy at least once since its start
    BACKOFF = "backoff"  # failed; waiting to be started again
    CRASH_LOOP = "crash_loop"  # failed too often: left down until reset
    STOPPED = "stopped"  # not supervised (stopped on purpose)


class Decision(str, enum.Enum):
    NONE = "none"
    FAILED = "failed"  # it exited: a restart follows after the backoff
    KILL = "kill"  # alive but failed (hung, or never ready): end it; a restart follows after the backoff
    RESTART = "restart"  # start it (again) now
    GIVE_UP = "give_up"  # crash loop: end it if alive and leave it down


@dataclass(frozen=True)
class Observation:
    alive: bool
    healthy: bool  # its health probe answered (True when it has no probe and is alive)


@dataclass
class ProgramPolicy:
    config: SupervisorSection
    state: ProgramState = ProgramState.STARTING
    started_at_s: float = 0.0
    last_healthy_s: float | None = None
    restart_at_s: float = 0.0
    last_failure: str = ""
    num_restarts: int = 0
    failures_s: deque[float] = field(default_factory=deque)

    def started(self, now_s: float) -> None:
        """The runner started (or restarted) the program at ``now_s``."""
        self.state = ProgramState.STARTING
        self.started_at_s = now_s
        self.last_healthy_s = None

    def reset(self, now_s: float) -> None:
        """Forget the failures (an operator fixed the cause) and start it again at once."""
        self.failures_s.clear()
        self.state = ProgramState.BACKOFF
        self.restart_at_s = now_s

    def stop(self) -> None:
        self.state = ProgramState.STOPPED

    def backoff_s(self) -> float:
        n = max(1, len(self.failures_s))
        c = self.config
        return min(c.backoff_max_s, c.backoff_initial_s * c.backoff_multiplier ** (n - 1))

    def _fail(self, now_s: float, reason: str, alive: bool) -> Decision:
        self.last_failure = reason
        self.failures_s.append(now_s)
        while self.failures_s and self.failures_s[0] < now_s - self.config.crash_loop_window_s:
            self.failures_s.popleft()
        if len(self.failures_s) >= self.config.crash_loop_failures:
            self.state = ProgramState.CRASH_LOOP
            return Decision.GIVE_UP
        self.state = ProgramState.BACKOFF
        self.restart_at_s = now_s + self.backoff_s()
        return Decision.KILL if alive else Decision.FAILED

    def observe(self, now_s: float, obs: Observation) -> Decision:
        """What to do now, given what the runner sees."""
        if self.state in (ProgramState.CRASH_LOOP, ProgramState.STOPPED):
            return Decision.NONE
        if self.state is ProgramState.BACKOFF:
            if now_s >= self.restart_at_s:
                self.num_restarts += 1
                return Decision.RESTART
            return Decision.NONE
        if not obs.alive:
            return self._fail(now_s, "exited", alive=False)
        if obs.healthy:
            self.state = ProgramState.RUNNING
            self.last_healthy_s = now_s
            return Decision.NONE
        if self.state is ProgramState.STARTING:
            if now_s - self.started_at_s > self.config.start_timeout_s:
                return self._fail(now_s, "not ready in time", alive=True)
            return Decision.NONE
        assert self.last_healthy_s is not None
        if now_s - self.last_healthy_s > self.config.unhealthy_after_s:
            return self._fail(now_s, "unhealthy", alive=True)
        return Decision.NONE
