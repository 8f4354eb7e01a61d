"""Power of two choices: sample two replicas, take the one with the lower least-load score."""

from __future__ import annotations

import random
from typing import Sequence

from gateway.config import RoutingSection
from gateway.policies.base import POLICIES, RouteRequest
from gateway.policies.least_load import load_score
from gateway.replicaset import Replica


@POLICIES.register("power_of_two")
class PowerOfTwoPolicy:
    name = "power_of_two"

    def __init__(self, config: RoutingSection, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()

    def select(self, candidates: Sequence[Replica], request: RouteRequest) -> Replica | None:
        fit = [r for r in candidates
               if not request.num_prompt_tokens or r.has_kv_headroom(request.num_prompt_tokens)]
        if len(fit) <= 1:
            return fit[0] if fit else None
        a, b = self._rng.sample(fit, 2)
        return a if load_score(a, self.config) <= load_score(b, self.config) else b
