import random

import pytest

from gateway.config import BreakerSection, RoutingSection
from gateway.policies import POLICIES, RouteRequest, make_policy
from gateway.policies.adapter_affinity import AdapterAffinityPolicy
from gateway.policies.least_load import LeastLoadPolicy
from gateway.policies.power_of_two import PowerOfTwoPolicy
from gateway.policies.round_robin import RoundRobinPolicy
from gateway.policies.session_affinity import SessionAffinityPolicy
from gateway.replicaset import ReplicaSet, ReplicaState, report_from_json
from gateway.sessions import SessionPlacements


def make_set(n: int, **report) -> ReplicaSet:  # type: ignore[no-untyped-def]
    rs = ReplicaSet(BreakerSection())
    for i in range(n):
        rep = rs.add(f"http://127.0.0.1:{9000 + i}")
        rs.set_report(rep, report_from_json({"replica_id": f"r{i}", "model": "qwen", "adapters": ["sql"] if i == 1 else [],
                                             "kv_bytes_free": 10_000, "kv_bytes_per_token": 10, **report}))
        rs.set_state(rep, ReplicaState.HEALTHY)
    return rs


def test_registry_error_lists_supported_names() -> None:
    with pytest.raises(ValueError, match="least_load, power_of_two, round_robin"):
        POLICIES.get("fastest")
    assert isinstance(make_policy("round_robin", RoutingSection()), RoundRobinPolicy)


def test_least_load_prefers_low_score_and_skips_replicas_without_kv_headroom() -> None:
    rs = make_set(3)
    r0, r1, r2 = rs.candidates("qwen")
    r0.report.queue_length = 5
    r1.report.queue_length = 0
    r2.report.queue_length = 1
    pol = LeastLoadPolicy(RoutingSection())
    assert pol.select([r0, r1, r2], RouteRequest("qwen")) is r1
    r1.num_inflight = 10
    assert pol.select([r0, r1, r2], RouteRequest("qwen")) is r2
    r2.report.kv_bytes_free = 50  # 5 tokens of headroom
    assert pol.select([r0, r1, r2], RouteRequest("qwen", num_prompt_tokens=100)) is r0
    for r in (r0, r1):
        r.report.kv_bytes_free = 0
        r.report.kv_bytes_used = 1
    assert pol.select([r0, r1, r2], RouteRequest("qwen", num_prompt_tokens=100)) is None


def test_power_of_two_takes_the_less_loaded_of_two_and_round_robin_rotates() -> None:
    rs = make_set(2)
    a, b = rs.candidates("qwen")
    a.num_inflight = 5
    pol = PowerOfTwoPolicy(RoutingSection(), rng=random.Random(1))
    assert all(pol.select([a, b], RouteRequest("qwen")) is b for _ in range(20))
    rr = RoundRobinPolicy(RoutingSection())
    picks = [rr.select([a, b], RouteRequest("qwen")) for _ in range(4)]
    assert picks.count(a) == 2 and picks.count(b) == 2


def _affinity(rs: ReplicaSet, placements: SessionPlacements, moves: list) -> SessionAffinityPolicy:  # type: ignore[type-arg]
    cfg = RoutingSection(bounded_load_factor=1.25)
    return SessionAffinityPolicy(cfg, LeastLoadPolicy(cfg), lambda: rs.ring_members, placements,
                                 on_move=lambda k, old, new: moves.append((k, old, new)))


def test_sessions_stick_move_on_failure_and_stay_moved() -> None:
    rs = make_set(4)
    placements = SessionPlacements()
    moves: list = []  # type: ignore[type-arg]
    pol = _affinity(rs, placements, moves)
    keys = [f"s{i}" for i in range(40)]
    homes = {k: pol.select(rs.candidates("qwen"), RouteRequest("qwen", session_key=k)) for k in keys}
    assert len(set(homes.values())) >= 3, "sessions spread over the ring"
    for k in keys:  # sticky
        assert pol.select(rs.candidates("qwen"), RouteRequest("qwen", session_key=k)) is homes[k]
    assert not moves
    victim = homes["s0"]
    rs.set_state(victim, ReplicaState.UNHEALTHY)
    moved = {k: pol.select(rs.candidates("qwen"), RouteRequest("qwen", session_key=k)) for k in keys}
    for k in keys:
        if homes[k] is victim:
            assert moved[k] is not victim and placements.get(k) == moved[k].url
        else:
            assert moved[k] is homes[k], "other sessions do not move"
    rs.set_state(victim, ReplicaState.HEALTHY)
    for k in keys:
        assert pol.select(rs.candidates("qwen"), RouteRequest("qwen", session_key=k)) is moved[k], "moved sessions stay"
    assert len(moves) == sum(1 for k in keys if homes[k] is victim)


def test_a_failed_replicas_sessions_spread_over_the_others() -> None:
    rs = make_set(4)
    pol = _affinity(rs, SessionPlacements(), [])
    keys = [f"conv-{i}" for i in range(400)]
    homes = {k: pol.select(rs.candidates("qwen"), RouteRequest("qwen", session_key=k)) for k in keys}
    victim = homes["conv-0"]
    rs.set_state(victim, ReplicaState.UNHEALTHY)
    orphans = [k for k in keys if homes[k] is victim]
    moved_to = {pol.select(rs.candidates("qwen"), RouteRequest("qwen", session_key=k)) for k in orphans}
    assert victim not in moved_to and len(moved_to) == 3, "each orphan follows its own point on the ring"


def test_bounded_load_spills_a_busy_home_without_moving_the_session() -> None:
    rs = make_set(3)
    placements = SessionPlacements()
    pol = _affinity(rs, placements, [])
    home = pol.select(rs.candidates("qwen"), RouteRequest("qwen", session_key="k"))
    home.num_inflight = 50
    other = pol.select(rs.candidates("qwen"), RouteRequest("qwen", session_key="k"))
    assert other is not home and placements.get("k") is None
    home.num_inflight = 0
    assert pol.select(rs.candidates("qwen"), RouteRequest("qwen", session_key="k")) is home


def test_no_session_key_uses_the_fallback_policy_and_adapter_affinity_prefers_holders() -> None:
    rs = make_set(3)
    base = rs.candidates("qwen")
    pol = AdapterAffinityPolicy(LeastLoadPolicy(RoutingSection()))
    holder = rs.candidates("qwen:sql")
    assert len(holder) == 1
    for _ in range(5):
        assert pol.select(base, RouteRequest("qwen:sql", adapter="sql")) is holder[0]
    assert pol.select(base, RouteRequest("qwen")) in base


def test_candidates_combine_health_and_breaker() -> None:
    rs = make_set(3)
    a, b, c = rs.candidates("qwen")
    rs.set_state(a, ReplicaState.SUSPECT)
    for _ in range(10):
        b.breaker.record_outcome(False)
    assert rs.candidates("qwen") == [c]
    assert rs.candidates("qwen", exclude={c}) == []


def test_the_config_names_exactly_the_registered_policies() -> None:
    from gateway.config import POLICY_NAMES

    assert POLICIES.names() == sorted(POLICY_NAMES)
