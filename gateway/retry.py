"""Retries before the first byte, in three pieces (tenacity does the waiting):

- :func:`is_retryable` — what may be retried on another replica (the classifier);
- :func:`make_backoff` — how long to wait: exponential with jitter;
- :class:`RetryExecutor` — runs attempts, stops at the attempt limit, the request's deadline or
  the :class:`RetryBudget`, and reports through :class:`RetryHooks` (the caller records metrics).

The budget keeps retries to at most ``budget_ratio`` of requests (plus ``budget_min_per_s`` so a
quiet gateway can still retry), so an outage is not amplified by retry storms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol, TypeVar

from tenacity import AsyncRetrying, RetryCallState, wait_exponential_jitter

from gateway.config import RetrySection
from gateway.replicaset import Replica
from unbroken.errors import OverloadedError, UnbrokenError, UpstreamError

T = TypeVar("T")


class AttemptError(Exception):
    """One attempt on one replica failed before the first byte reached the client."""

    def __init__(self, error: UnbrokenError, replica: Replica | None, reason: str) -> None:
        super().__init__(f"{reason}: {error.message}")
        self.error = error
        self.replica = replica
        self.reason = reason  # "connect" | "timeout" | "status_5xx" | "stall" | "overloaded" | "closed" | ...


def is_retryable(exc: BaseException) -> bool:
    """Replica failures and replica overload are retried elsewhere; a client's mistake, a deadline,
    or no replica at all are not."""
    if not isinstance(exc, AttemptError):
        return False
    err = exc.error
    return isinstance(err, (UpstreamError, OverloadedError)) or (err.status >= 500 and err.blames_replica)


def make_backoff(config: RetrySection) -> wait_exponential_jitter:
    return wait_exponential_jitter(
        multiplier=config.backoff_initial_ms / 1000.0,
        max=config.backoff_max_ms / 1000.0,
        exp_base=config.backoff_multiplier,
        jitter=config.backoff_initial_ms / 1000.0,
    )


class RetryBudget:
    """A token bucket: every request deposits ``ratio`` tokens, the clock adds ``min_per_s`` a
    second, a retry takes one. It starts with (and holds at most) a window's worth of the
    reserve plus the deposits, so over any stretch retries <= ratio x requests + min_per_s x seconds
    + one window of reserve."""

    def __init__(self, ratio: float, min_per_s: float, window_s: float, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.reserve = min_per_s * window_s
        self.max_tokens = self.reserve + max(1.0, ratio * 10_000)
        self._clock = clock
        self._tokens = self.reserve
        self._last_s = clock()
        self.num_requests = 0
        self.num_retries = 0

    def _refill(self) -> None:
        now = self._clock()
        if self.min_per_s:
            self._tokens = min(self.max_tokens, self._tokens + (now - self._last_s) * self.min_per_s)
        self._last_s = now

    def on_request(self) -> None:
        self.num_requests += 1
        self._tokens = min(self.max_tokens, self._tokens + self.ratio)

    def try_spend(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.num_retries += 1
            return True
        return False

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens


class RetryHooks(Protocol):
    def on_retry(self, exc: AttemptError, attempt_number: int, sleep_s: float) -> None: ...

    def on_budget_exhausted(self, exc: AttemptError) -> None: ...


@dataclass
class _Stop:
    max_attempts: int
    deadline_s: float  # monotonic
    budget: RetryBudget
    hooks: RetryHooks | None

    def __call__(self, state: RetryCallState) -> bool:
        if state.attempt_number >= self.max_attempts:
            return True
        if time.monotonic() + (state.upcoming_sleep or 0.0) >= self.deadline_s:
            return True
        if not self.budget.try_spend():
            exc = state.outcome.exception() if state.outcome else None
            if self.hooks is not None and isinstance(exc, AttemptError):
                self.hooks.on_budget_exhausted(exc)
            return True
        return False


class RetryExecutor:
    def __init__(self, config: RetrySection, budget: RetryBudget) -> None:
        self.config = config
        self.budget = budget
        self._wait = make_backoff(config)

    def max_attempts_for(self, priority: str) -> int:
        if priority == "critical":
            return self.config.max_attempts_critical
        if priority == "batch":
            return self.config.max_attempts_batch
        return self.config.max_attempts

    async def run(self, attempt: Callable[[int], Awaitable[T]], *, max_attempts: int, deadline_s: float,
                  hooks: RetryHooks | None = None) -> T:
        """Call ``attempt(n)`` (n = 1, 2, ...) until it returns or a non-retryable error, the attempt
        limit, the deadline or the budget stops it; the last error is raised."""

        # Fast path: most requests succeed at once, and building a tenacity controller costs more
        # than the request's own routing. Only a retryable failure enters the retry loop, which
        # starts by replaying that failure so tenacity sees (and waits after) every attempt.
        try:
            return await attempt(1)
        except AttemptError as e:
            if not is_retryable(e) or max_attempts <= 1:
                raise
            first_failure: AttemptError | None = e

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if hooks is not None and isinstance(exc, AttemptError):
                hooks.on_retry(exc, state.attempt_number, state.upcoming_sleep or 0.0)

        retrying = AsyncRetrying(
            retry=lambda state: state.outcome is not None and state.outcome.failed
            and is_retryable(state.outcome.exception()),
            stop=_Stop(max_attempts, deadline_s, self.budget, hooks),
            wait=self._wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        async for trial in retrying:
            with trial:
                n = trial.retry_state.attempt_number
                if n == 1 and first_failure is not None:
                    failure, first_failure = first_failure, None
                    raise failure
                return await attempt(n)
        raise AssertionError("unreachable")  # pragma: no cover
