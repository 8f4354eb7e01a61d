"""Per-replica circuit breaker: is this replica failing the requests we send it?

Closed -> Open when ``failure_threshold`` consecutive failures happen, or when the failure share of
the last ``window_requests`` outcomes passes ``failure_rate_threshold`` (after ``min_requests``).
Open -> HalfOpen after ``open_duration_s``; HalfOpen lets ``half_open_max_probes`` requests
through at a time and closes after ``half_open_successes`` successes, or opens again on a failure.

The breaker only counts what the caller reports through :meth:`record_outcome`; the caller decides
what is a failure (a client's 4xx never is). It knows nothing of heartbeats (see ``health.py``).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque

from gateway.config import BreakerSection

log = logging.getLogger(__name__)


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, config: BreakerSection, clock=time.monotonic, name: str = "") -> None:  # type: ignore[no-untyped-def]
        self.config = config
        self.name = name  # for the log line when it opens
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.num_consecutive_failures = 0
        self._window: deque[bool] = deque(maxlen=config.window_requests)
        self._num_window_failures = 0
        self._opened_at_s = 0.0
        self._num_probes_in_flight = 0
        self._num_probe_successes = 0
        self.num_trips = 0

    def allows_request(self) -> bool:
        """Whether routing may pick this replica now (moves Open -> HalfOpen when the time is up)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at_s < self.config.open_duration_s:
                return False
            self.state = BreakerState.HALF_OPEN
            self._num_probes_in_flight = 0
            self._num_probe_successes = 0
        return self._num_probes_in_flight < self.config.half_open_max_probes

    def on_dispatch(self) -> None:
        """A request was sent to this replica (counts half-open probes)."""
        if self.state is BreakerState.HALF_OPEN:
            self._num_probes_in_flight += 1

    def record_outcome(self, success: bool) -> None:
        """Report one request's outcome. Only failures the replica is to blame for are ``False``."""
        if self.state is BreakerState.HALF_OPEN:
            self._num_probes_in_flight = max(0, self._num_probes_in_flight - 1)
            if not success:
                self._trip()
                return
            self._num_probe_successes += 1
            if self._num_probe_successes >= self.config.half_open_successes:
                self._close()
            return
        if self.state is BreakerState.OPEN:
            return
        if len(self._window) == self._window.maxlen and not self._window[0]:
            self._num_window_failures -= 1
        self._window.append(success)
        if success:
            self.num_consecutive_failures = 0
            return
        self._num_window_failures += 1
        self.num_consecutive_failures += 1
        if self.num_consecutive_failures >= self.config.failure_threshold:
            self._trip()
        elif (len(self._window) >= self.config.min_requests
              and self._num_window_failures / len(self._window) >= self.config.failure_rate_threshold):
            self._trip()

    def release_probe(self) -> None:
        """A dispatched request ended with an outcome that says nothing about the replica."""
        if self.state is BreakerState.HALF_OPEN:
            self._num_probes_in_flight = max(0, self._num_probes_in_flight - 1)

    def _trip(self) -> None:
        log.warning("breaker of %s opened (%s): %d consecutive failures, %d of the last %d outcomes failed; "
                    "probing again in %.1fs", self.name or "a replica",
                    "probe failed" if self.state is BreakerState.HALF_OPEN else "closed -> open",
                    self.num_consecutive_failures, self._num_window_failures, len(self._window),
                    self.config.open_duration_s)
        self.state = BreakerState.OPEN
        self._opened_at_s = self._clock()
        self.num_trips += 1
        self._num_probes_in_flight = 0

    def _close(self) -> None:
        log.info("breaker of %s closed: the probes succeeded", self.name or "a replica")
        self.state = BreakerState.CLOSED
        self.num_consecutive_failures = 0
        self._window.clear()
        self._num_window_failures = 0
