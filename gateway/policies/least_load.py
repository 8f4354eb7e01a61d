"""Least-load: the replica with the lowest load score among those with KV headroom for the prompt."""

from __future__ import annotations

from typing import Sequence

from gateway.config import RoutingSection
from gateway.policies.base import POLICIES, RouteRequest
from gateway.replicaset import Replica


def load_score(rep: Replica, config: RoutingSection) -> float:
    """Lower is better: queue, running sequences and KV use from the last heartbeat, plus the
    gateway's own in-flight requests (which the heartbeat has not seen yet), minus a throughput bonus."""
    score = config.inflight_weight * rep.num_inflight
    r = rep.report
    if r is not None:
        score += config.queue_weight * r.queue_length + config.running_weight * r.num_running
        score += config.kv_weight * rep.kv_used_fraction
        score -= config.throughput_weight * r.tokens_per_s / 1000.0
    return score


@POLICIES.register("least_load")
class LeastLoadPolicy:
    name = "least_load"

    def __init__(self, config: RoutingSection) -> None:
        self.config = config
        self._tie = 0

    def select(self, candidates: Sequence[Replica], request: RouteRequest) -> Replica | None:
        best: Replica | None = None
        best_score = 0.0
        n = len(candidates)
        self._tie += 1
        for i in range(n):  # start at a rotating offset so ties spread over replicas
            rep = candidates[(i + self._tie) % n]
            if request.num_prompt_tokens and not rep.has_kv_headroom(request.num_prompt_tokens):
                continue
            s = load_score(rep, self.config)
            if best is None or s < best_score:
                best, best_score = rep, s
        return best
