"""The circuit breaker: it opens after consecutive failures and lets a trial through when half-open."""

from __future__ import annotations

from microserve.router.breaker import BreakerConfig, CircuitBreaker, CircuitState
from tests.clocks import Clock


def test_breaker_opens_after_consecutive_failures_and_trials_when_half_open() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=3, open_s=5, max_open_s=20), clock)
    breaker.on_failure()
    breaker.on_failure()
    breaker.on_success()  # a success resets the count: failures must be consecutive
    breaker.on_failure()
    breaker.on_failure()
    assert breaker.state is CircuitState.CLOSED and breaker.allows()
    breaker.on_failure()
    assert breaker.state is CircuitState.OPEN and not breaker.allows()
    clock.now = 4.9
    assert not breaker.allows()
    clock.now = 5.0
    assert breaker.state is CircuitState.HALF_OPEN and breaker.allows()
    breaker.on_dispatch()
    assert not breaker.allows()  # one trial at a time
    breaker.on_failure()  # the trial failed: open again, for twice as long
    assert breaker.state is CircuitState.OPEN
    clock.now = 14.9
    assert breaker.state is CircuitState.OPEN
    clock.now = 15.0
    breaker.on_dispatch()
    breaker.on_release()  # the trial ended without a verdict (client left): another may go
    assert breaker.allows()
    breaker.on_dispatch()
    breaker.on_success()
    assert breaker.state is CircuitState.CLOSED and breaker.allows()
