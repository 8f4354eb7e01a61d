"""Stability: a replica that keeps failing gets less new work, and critical requests avoid it.

Wraps the policy chain. ``X-Priority: critical`` requests choose among the stable candidates
(:meth:`~gateway.stability.StabilityScore.is_stable`) whenever there is one. Other requests without
a session keep each candidate with probability equal to its stability weight (1 when quiet,
1 / (1 + score) after incidents) relative to the best candidate's, so an unstable replica's share
of new work shrinks with its score and grows back as the incidents decay, and replicas that are
alike are not thinned at all. Requests with a session are left to session affinity unless
critical: moving a session costs its KV locality. When thinning leaves nothing the inner policy can
use, it gets every candidate (stability never turns a servable request away).
"""

from __future__ import annotations

import random
import time
from typing import Callable, Sequence

from gateway.policies import RouteRequest, RoutingPolicy
from gateway.replicaset import Replica


class StabilityPolicy:
    name = "stability"

    def __init__(self, inner: RoutingPolicy, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self._rng = rng or random.Random()
        self._clock = clock

    def narrow(self, candidates: Sequence[Replica], request: RouteRequest) -> Sequence[Replica]:
        """The candidates this request should choose among (the policy's pure half)."""
        if len(candidates) <= 1:
            return candidates
        now = self._clock()
        if request.priority == "critical":
            stable = [r for r in candidates if r.stability.is_stable(now)]
            return stable or candidates
        if request.session_key:
            return candidates
        weights = [r.stability.weight(now) for r in candidates]
        best = max(weights)
        if min(weights) >= best:
            return candidates  # all alike (all quiet, usually): nothing to weigh
        kept = [r for r, w in zip(candidates, weights) if w >= best or self._rng.random() < w / best]
        return kept or candidates

    def select(self, candidates: Sequence[Replica], request: RouteRequest) -> Replica | None:
        pool = self.narrow(candidates, request)
        chosen = self.inner.select(pool, request)
        if chosen is None and len(pool) < len(candidates):
            chosen = self.inner.select(candidates, request)
        return chosen
