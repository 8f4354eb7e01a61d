"""The stability scorer, the policy that weighs by it, and warm standbys in the replica set."""

import random

from gateway.config import BreakerSection, RoutingSection, StabilitySection
from gateway.policies import RouteRequest
from gateway.policies.least_load import LeastLoadPolicy
from gateway.policies.stability import StabilityPolicy
from gateway.replicaset import ReplicaSet, ReplicaState, report_from_json
from gateway.stability import Incident, StabilityScore


def test_score_is_zero_when_quiet_and_halves_every_half_life() -> None:
    s = StabilityScore(StabilitySection(half_life_s=10.0, jitter_weight=0.0))
    assert s.score(0.0) == 0.0 and s.weight(0.0) == 1.0 and s.is_stable(0.0)
    s.record(Incident.FAILURE, 100.0)
    s.record(Incident.RESTART, 100.0)
    assert s.score(100.0) == 2.0
    assert abs(s.score(110.0) - 1.0) < 1e-9
    assert abs(s.score(130.0) - 0.25) < 1e-9
    assert not s.is_stable(100.0) and s.is_stable(130.0)
    assert abs(s.weight(100.0) - 1 / 3) < 1e-9
    assert s.num_incidents == {"failure": 1, "restart": 1}


def test_incident_weights_and_counts() -> None:
    cfg = StabilitySection(failure_weight=2.0, stall_weight=0.25, breaker_trip_weight=0.5, jitter_weight=0.0)
    s = StabilityScore(cfg)
    s.record(Incident.STALL, 0.0)
    s.record(Incident.BREAKER_TRIP, 0.0, count=2)
    assert s.score(0.0) == 1.25
    s.record(Incident.FAILURE, 0.0)
    assert s.score(0.0) == 3.25


def test_heartbeat_jitter_counts_only_over_its_window() -> None:
    s = StabilityScore(StabilitySection(jitter_weight=10.0, jitter_window=4, jitter_floor_ms=20.0))
    for _ in range(4):
        s.record_rtt(0.002)
    assert s.jitter_s() == 0.0 and s.score(0.0) == 0.0
    for rtt in (0.002, 0.2, 0.002, 0.2):
        s.record_rtt(rtt)
    assert s.jitter_s() > 0.1 and not s.is_stable(0.0)
    for rtt in (0.002, 0.03, 0.002, 0.03):
        s.record_rtt(rtt)  # ~16 ms of jitter: under the floor
    assert 0.0 < s.jitter_s() < 0.02 and s.score(0.0) == 0.0
    for _ in range(4):
        s.record_rtt(0.003)  # the window forgets the jitter
    assert s.jitter_s() == 0.0


def _set(n: int, standby: int = 0, clock=lambda: 0.0) -> ReplicaSet:  # type: ignore[no-untyped-def]
    rs = ReplicaSet(BreakerSection(), StabilitySection(jitter_weight=0.0), clock=clock)
    for i in range(n + standby):
        rep = rs.add(f"http://127.0.0.1:{9000 + i}", standby=i >= n)
        rs.set_report(rep, report_from_json({"replica_id": f"r{i}", "model": "qwen", "pid": 100 + i}))
        rs.set_state(rep, ReplicaState.HEALTHY)
    return rs


def test_unstable_replica_gets_less_work_and_critical_requests_avoid_it() -> None:
    rs = _set(2)
    stable, flaky = rs.candidates("qwen")
    for _ in range(3):
        flaky.stability.record(Incident.FAILURE, 0.0)  # score 3: weight 1/4
    pol = StabilityPolicy(LeastLoadPolicy(RoutingSection()), rng=random.Random(3), clock=lambda: 0.0)
    picks = [pol.select([stable, flaky], RouteRequest("qwen")) for _ in range(2000)]
    share = picks.count(flaky) / len(picks)
    assert 0.05 < share < 0.25, share  # ~1/8 (kept 1/4 of the time, then a fair tie-break)
    assert all(pol.select([stable, flaky], RouteRequest("qwen", priority="critical")) is stable for _ in range(50))
    # Alone, it still serves; a critical request is not turned away.
    assert pol.select([flaky], RouteRequest("qwen", priority="critical")) is flaky
    # Replicas that are alike are not thinned, even when neither is quiet.
    stable.stability.record(Incident.FAILURE, 0.0)
    stable.stability.record(Incident.FAILURE, 0.0)
    stable.stability.record(Incident.FAILURE, 0.0)
    assert pol.narrow([stable, flaky], RouteRequest("qwen")) == [stable, flaky]
    # Sessions stay on their replica unless critical.
    assert StabilityPolicy(LeastLoadPolicy(RoutingSection())).narrow(
        [stable, flaky], RouteRequest("qwen", session_key="s")) == [stable, flaky]


def test_restart_and_state_changes_are_incidents() -> None:
    rs = _set(2)
    a, _ = rs.candidates("qwen")
    rs.set_state(a, ReplicaState.UNHEALTHY)
    rs.set_report(a, report_from_json({"replica_id": "r0", "model": "qwen", "pid": 999}))
    rs.set_state(a, ReplicaState.HEALTHY)
    assert a.stability.num_incidents == {"failure": 1, "restart": 1}
    assert not a.stability.is_stable(0.0)


def test_standby_is_never_routed_and_is_promoted_when_a_replica_fails() -> None:
    rs = _set(2, standby=1)
    r0, r1, r2 = rs.find("r0"), rs.find("r1"), rs.find("r2")
    assert r2.state is ReplicaState.STANDBY and rs.num_standby_ready() == 1
    assert r2 not in rs.candidates("qwen") and rs.num_healthy() == 2
    rs.set_state(r0, ReplicaState.UNHEALTHY)
    assert r2.state is ReplicaState.HEALTHY and not r2.standby
    assert set(rs.candidates("qwen")) == {r1, r2} and rs.num_promotions == 1
    # The failed replica took the standby role: back, it waits as the standby.
    rs.set_state(r0, ReplicaState.HEALTHY)
    assert r0.state is ReplicaState.STANDBY and r0.to_admin_dict()["role"] == "standby"
    assert set(rs.candidates("qwen")) == {r1, r2}


def test_no_promotion_without_a_ready_standby_and_a_failed_standby_is_not_replaced() -> None:
    rs = _set(1, standby=1)
    r0, r1 = rs.find("r0"), rs.find("r1")
    rs.set_state(r1, ReplicaState.UNHEALTHY)  # the standby itself dies
    assert rs.num_promotions == 0 and r0.state is ReplicaState.HEALTHY
    rs.set_state(r0, ReplicaState.UNHEALTHY)  # no standby ready: r0 stays active
    assert rs.num_promotions == 0 and not r0.standby
    rs.set_state(r0, ReplicaState.HEALTHY)
    assert r0.state is ReplicaState.HEALTHY
