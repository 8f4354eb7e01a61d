"""Round-robin: the baseline; ignores load and memory."""

from __future__ import annotations

from typing import Sequence

from gateway.config import RoutingSection
from gateway.policies.base import POLICIES, RouteRequest
from gateway.replicaset import Replica


@POLICIES.register("round_robin")
class RoundRobinPolicy:
    name = "round_robin"

    def __init__(self, config: RoutingSection) -> None:
        self._next = 0

    def select(self, candidates: Sequence[Replica], request: RouteRequest) -> Replica | None:
        if not candidates:
            return None
        self._next += 1
        return candidates[self._next % len(candidates)]
