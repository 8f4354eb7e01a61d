import time

import pytest

from gateway.config import RetrySection
from gateway.retry import AttemptError, RetryBudget, RetryExecutor, is_retryable
from unbroken.errors import InvalidRequestError, NoReplicaError, OverloadedError, UpstreamError


class Hooks:
    def __init__(self) -> None:
        self.retries: list[tuple[str, int]] = []
        self.exhausted = 0

    def on_retry(self, exc: AttemptError, attempt_number: int, sleep_s: float) -> None:
        self.retries.append((exc.reason, attempt_number))

    def on_budget_exhausted(self, exc: AttemptError) -> None:
        self.exhausted += 1


def test_classifier() -> None:
    assert is_retryable(AttemptError(UpstreamError("x"), None, "connect"))
    assert is_retryable(AttemptError(OverloadedError("x"), None, "overloaded"))
    assert not is_retryable(AttemptError(InvalidRequestError("x"), None, "client_error"))
    assert not is_retryable(AttemptError(NoReplicaError("x"), None, "no_replica"))
    assert not is_retryable(ValueError("x"))


def test_budget_limits_retries_to_the_configured_share() -> None:
    now = [0.0]
    budget = RetryBudget(ratio=0.1, min_per_s=0.0, window_s=10, clock=lambda: now[0])
    granted = 0
    for _ in range(1000):
        budget.on_request()
        if budget.try_spend():
            granted += 1
    assert 95 <= granted <= 100
    assert not budget.try_spend()
    quiet = RetryBudget(ratio=0.0, min_per_s=2.0, window_s=1, clock=lambda: now[0])
    assert quiet.try_spend() and quiet.try_spend() and not quiet.try_spend()
    now[0] += 1.0
    assert quiet.try_spend()


@pytest.mark.asyncio
async def test_executor_retries_then_succeeds_and_reports_through_hooks() -> None:
    cfg = RetrySection(max_attempts=3, backoff_initial_ms=1, backoff_max_ms=2)
    ex = RetryExecutor(cfg, RetryBudget(1.0, 100.0, 10))
    hooks = Hooks()
    calls = []

    async def attempt(n: int) -> str:
        calls.append(n)
        if n < 3:
            raise AttemptError(UpstreamError("boom"), None, "status_5xx")
        return "ok"

    assert await ex.run(attempt, max_attempts=3, deadline_s=time.monotonic() + 5, hooks=hooks) == "ok"
    assert calls == [1, 2, 3] and hooks.retries == [("status_5xx", 1), ("status_5xx", 2)]


@pytest.mark.asyncio
async def test_executor_does_not_retry_client_errors_and_stops_at_the_limit() -> None:
    cfg = RetrySection(backoff_initial_ms=1, backoff_max_ms=2)
    ex = RetryExecutor(cfg, RetryBudget(1.0, 100.0, 10))
    calls = []

    async def bad(n: int) -> None:
        calls.append(n)
        raise AttemptError(InvalidRequestError("no"), None, "client_error")

    with pytest.raises(AttemptError) as ei:
        await ex.run(bad, max_attempts=5, deadline_s=time.monotonic() + 5)
    assert isinstance(ei.value.error, InvalidRequestError) and calls == [1]

    async def down(n: int) -> None:
        calls.append(n)
        raise AttemptError(UpstreamError("down"), None, "connect")

    calls.clear()
    with pytest.raises(AttemptError):
        await ex.run(down, max_attempts=4, deadline_s=time.monotonic() + 5)
    assert calls == [1, 2, 3, 4]


@pytest.mark.asyncio
async def test_executor_respects_budget_and_deadline() -> None:
    cfg = RetrySection(backoff_initial_ms=50, backoff_max_ms=50)
    hooks = Hooks()
    ex = RetryExecutor(cfg, RetryBudget(0.0, 0.0, 1))  # no budget at all
    calls = []

    async def down(n: int) -> None:
        calls.append(n)
        raise AttemptError(UpstreamError("down"), None, "connect")

    with pytest.raises(AttemptError):
        await ex.run(down, max_attempts=5, deadline_s=time.monotonic() + 5, hooks=hooks)
    assert calls == [1] and hooks.exhausted == 1
    ex = RetryExecutor(cfg, RetryBudget(1.0, 100.0, 10))
    calls.clear()
    t0 = time.monotonic()
    with pytest.raises(AttemptError):
        await ex.run(down, max_attempts=50, deadline_s=time.monotonic() + 0.2)
    assert time.monotonic() - t0 < 0.5 and len(calls) < 8



def test_backoff_grows_with_jitter() -> None:
    from gateway.retry import make_backoff

    class S:
        def __init__(self, n: int) -> None:
            self.attempt_number = n

    w = make_backoff(RetrySection(backoff_initial_ms=10, backoff_max_ms=1000, backoff_multiplier=2))
    assert 0.01 <= w(S(1)) <= 0.02 + 1e-9
    assert 0.04 <= w(S(3)) <= 0.05 + 1e-9
    assert w(S(30)) <= 1.0
