"""Adapter affinity: for ``model:ADAPTER`` prefer replicas that already hold the adapter; when none
in rotation does, hand the base model's replicas to the inner policy."""

from __future__ import annotations

from typing import Sequence

from gateway.policies.base import RouteRequest, RoutingPolicy
from gateway.replicaset import Replica


class AdapterAffinityPolicy:
    name = "adapter_affinity"

    def __init__(self, inner: RoutingPolicy) -> None:
        self.inner = inner

    def select(self, candidates: Sequence[Replica], request: RouteRequest) -> Replica | None:
        if request.adapter:
            holders = [r for r in candidates if r.serves(request.model)]
            if holders:
                return self.inner.select(holders, request)
        return self.inner.select(candidates, request)
