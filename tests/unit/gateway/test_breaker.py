from gateway.breaker import BreakerState, CircuitBreaker
from gateway.config import BreakerSection


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(**kw):  # type: ignore[no-untyped-def]
    clock = FakeClock()
    cfg = BreakerSection(**{"failure_threshold": 3, "open_duration_s": 1.0, "half_open_successes": 2, **kw})
    return CircuitBreaker(cfg, clock=clock), clock


def test_trips_after_consecutive_failures_and_recovers_through_half_open() -> None:
    b, clock = make()
    for _ in range(2):
        b.record_outcome(False)
    assert b.state is BreakerState.CLOSED and b.allows_request()
    b.record_outcome(False)
    assert b.state is BreakerState.OPEN and not b.allows_request()
    clock.now += 1.01
    assert b.allows_request() and b.state is BreakerState.HALF_OPEN
    b.on_dispatch()
    assert not b.allows_request(), "only one probe at a time"
    b.record_outcome(True)
    assert b.state is BreakerState.HALF_OPEN
    b.on_dispatch()
    b.record_outcome(True)
    assert b.state is BreakerState.CLOSED and b.num_trips == 1


def test_a_failed_probe_opens_again() -> None:
    b, clock = make()
    for _ in range(3):
        b.record_outcome(False)
    clock.now += 1.5
    assert b.allows_request()
    b.on_dispatch()
    b.record_outcome(False)
    assert b.state is BreakerState.OPEN and b.num_trips == 2
    assert not b.allows_request()


def test_successes_reset_the_consecutive_count_but_the_rate_still_trips() -> None:
    b, _ = make(failure_threshold=100, window_requests=10, min_requests=10, failure_rate_threshold=0.5)
    for i in range(9):
        b.record_outcome(i % 2 == 0)  # 5 ok, 4 failed
    assert b.state is BreakerState.CLOSED
    b.record_outcome(False)  # 5 of 10 failed
    assert b.state is BreakerState.OPEN


def test_released_probe_frees_the_slot() -> None:
    b, clock = make()
    for _ in range(3):
        b.record_outcome(False)
    clock.now += 2
    assert b.allows_request()
    b.on_dispatch()
    b.release_probe()
    assert b.allows_request()
