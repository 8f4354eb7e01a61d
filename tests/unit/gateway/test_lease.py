"""The attempt lease: one acquire, one release, whatever the exit."""

from __future__ import annotations

from gateway.breaker import BreakerState, CircuitBreaker
from gateway.config import BreakerSection
from gateway.lease import AttemptLease, Outcome
from gateway.replicaset import Replica


class _Resp:
    def __init__(self) -> None:
        self.released = self.closed = False

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


def _replica(**breaker: object) -> Replica:
    return Replica(url="http://127.0.0.1:1", breaker=CircuitBreaker(BreakerSection(**breaker)))


def test_inflight_balances_and_second_release_is_ignored() -> None:
    rep = _replica()
    leases = [AttemptLease(rep) for _ in range(3)]
    assert rep.num_inflight == 3
    assert leases[0].release(Outcome.SUCCESS)
    assert not leases[0].release(Outcome.FAILURE)  # ignored: counted once, no breaker failure
    leases[1].release(Outcome.NEUTRAL)
    leases[2].release(Outcome.NEUTRAL)
    assert rep.num_inflight == 0
    assert rep.breaker is not None and rep.breaker.num_consecutive_failures == 0


def test_failures_reach_the_breaker_and_neutral_does_not() -> None:
    rep = _replica(failure_threshold=2)
    for _ in range(5):
        AttemptLease(rep).release(Outcome.NEUTRAL)
    assert rep.breaker is not None and rep.breaker.state is BreakerState.CLOSED
    AttemptLease(rep).release(Outcome.FAILURE)
    AttemptLease(rep).release(Outcome.FAILURE)
    assert rep.breaker.state is BreakerState.OPEN
    assert rep.num_inflight == 0


def test_attached_response_is_kept_on_success_and_dropped_otherwise() -> None:
    rep = _replica()
    ok, bad = _Resp(), _Resp()
    a, b = AttemptLease(rep), AttemptLease(rep)
    a.attach(ok)  # type: ignore[arg-type]
    b.attach(bad)  # type: ignore[arg-type]
    a.release(Outcome.SUCCESS)
    b.release(Outcome.NEUTRAL)
    assert ok.released and not ok.closed
    assert bad.closed and not bad.released
