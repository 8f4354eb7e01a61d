"""Routing policies: one file each, behind one :class:`RoutingPolicy` protocol, chosen by name.

``select(candidates, request) -> Replica | None``: ``candidates`` are already filtered to replicas
in rotation (healthy by heartbeat, breaker allowing) that serve the model; ``None`` means none of
them can take the request (e.g. no KV headroom), which the caller treats as short capacity.
"""

from __future__ import annotations

from gateway.config import RoutingSection
from gateway.policies.base import POLICIES, Registry, RouteRequest, RoutingPolicy

# Importing the modules registers them.
from gateway.policies import least_load, power_of_two, round_robin  # noqa: E402,F401,I001

__all__ = ["POLICIES", "Registry", "RouteRequest", "RoutingPolicy", "make_policy"]


def make_policy(name: str, config: RoutingSection) -> RoutingPolicy:
    return POLICIES.get(name)(config)
