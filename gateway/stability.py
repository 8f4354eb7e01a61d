"""How stable each replica has been lately: a small scorer that routing reads.

A replica that keeps dying, stalling or tripping its breaker is healthy again after each incident,
so health and breaker alone send it full work the moment it answers. :class:`StabilityScore` keeps
a decaying sum of its recent incidents (each kind with a weight; every point halves after
``half_life_s``) plus a term for the jitter of its heartbeat round trips. The score is 0 for a
replica that has been quiet for a while; :meth:`StabilityScore.weight` maps it to the share of new
work the replica should get (1 = full), and :meth:`StabilityScore.is_stable` says whether
``X-Priority: critical`` requests may go there. The scorer is pure (time is passed in) and owned by
the event loop like the rest of :class:`~gateway.replicaset.Replica`.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field

from gateway.config import StabilitySection


class Incident(str, enum.Enum):
    FAILURE = "failure"
    STALL = "stall"
    RESTART = "restart"
    BREAKER_TRIP = "breaker_trip"


@dataclass
class StabilityScore:
    """Decaying incident score of one replica. ``now_s`` is a monotonic clock in seconds."""

    config: StabilitySection = field(default_factory=StabilitySection)
    _score: float = 0.0
    _at_s: float = 0.0
    num_incidents: dict[str, int] = field(default_factory=dict)
    _rtts_s: deque[float] = field(default_factory=deque)

    def _decayed(self, now_s: float) -> float:
        if self._score <= 0.0:
            return 0.0
        dt = max(0.0, now_s - self._at_s)
        return self._score * math.pow(0.5, dt / self.config.half_life_s)

    def record(self, incident: Incident, now_s: float, count: int = 1) -> None:
        """One (or ``count``) incidents of a kind, now."""
        w = {Incident.FAILURE: self.config.failure_weight, Incident.STALL: self.config.stall_weight,
             Incident.RESTART: self.config.restart_weight,
             Incident.BREAKER_TRIP: self.config.breaker_trip_weight}[incident]
        self._score = self._decayed(now_s) + w * count
        self._at_s = now_s
        self.num_incidents[incident.value] = self.num_incidents.get(incident.value, 0) + count

    def record_rtt(self, rtt_s: float) -> None:
        """The round trip of one answered heartbeat."""
        self._rtts_s.append(rtt_s)
        while len(self._rtts_s) > self.config.jitter_window:
            self._rtts_s.popleft()

    def jitter_s(self) -> float:
        """Standard deviation of the recent heartbeat round trips (0 with fewer than 2)."""
        n = len(self._rtts_s)
        if n < 2:
            return 0.0
        mean = sum(self._rtts_s) / n
        return math.sqrt(sum((x - mean) ** 2 for x in self._rtts_s) / (n - 1))

    def score(self, now_s: float) -> float:
        excess_s = max(0.0, self.jitter_s() - self.config.jitter_floor_ms / 1000.0)
        return self._decayed(now_s) + self.config.jitter_weight * excess_s

    def weight(self, now_s: float) -> float:
        """Share of new work this replica should get: 1 when quiet, falling as 1 / (1 + score)."""
        return 1.0 / (1.0 + self.score(now_s))

    def is_stable(self, now_s: float) -> bool:
        return self.score(now_s) < self.config.unstable_score

    def to_admin_dict(self, now_s: float) -> dict[str, object]:
        return {"score": round(self.score(now_s), 3), "weight": round(self.weight(now_s), 3),
                "stable": self.is_stable(now_s), "heartbeat_jitter_ms": round(self.jitter_s() * 1000, 2),
                "incidents": dict(self.num_incidents)}
