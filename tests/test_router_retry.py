"""Retry backoff (full jitter, capped) and the retry budget."""

from __future__ import annotations

import random

from microserve.router.retry import RetryBudget, RetryConfig, backoff_s
from tests.clocks import Clock


def test_backoff_is_full_jitter_capped() -> None:
    config = RetryConfig(backoff_base_s=0.1, backoff_max_s=0.5)
    rng = random.Random(7)
    for attempt in range(1, 8):
        bound = min(0.5, 0.1 * 2**attempt)
        samples = [backoff_s(attempt, config, rng) for _ in range(200)]
        assert all(0 <= s <= bound for s in samples)
        assert max(samples) > 0.8 * bound  # spread over the whole range, not a fixed delay


def test_retry_budget_allows_a_ratio_of_requests_plus_a_trickle() -> None:
    clock = Clock()
    budget = RetryBudget(RetryConfig(budget_ratio=0.5, budget_min_per_s=1.0), clock)
    spent = sum(budget.try_spend() for _ in range(20))
    assert spent == 10  # starts with 10 s of the trickle: a quiet router can retry at once
    assert not budget.try_spend()
    for _ in range(4):
        budget.on_request()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]  # 4 requests x 0.5
    clock.now = 1.0
    assert budget.try_spend() and not budget.try_spend()  # one more per second
