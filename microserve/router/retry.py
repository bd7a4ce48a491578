"""When a failed attempt may be tried again on another worker: jittered backoff, a retry budget shared by
all requests (so retries cannot multiply an overload), and one deadline per request."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class RetryConfig:
    max_attempts: int = 3  # attempts per request, the first included
    backoff_base_s: float = 0.02
    backoff_max_s: float = 1.0
    budget_ratio: float = 0.2  # retries allowed per request sent, over time
    budget_min_per_s: float = 10.0  # retries always allowed per second, so a quiet router can still retry

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            raise ValueError("need 0 <= backoff_base_s <= backoff_max_s")
        if self.budget_ratio < 0 or self.budget_min_per_s < 0:
            raise ValueError("the retry budget must be non-negative")


def backoff_s(attempt: int, config: RetryConfig, rng: random.Random) -> float:
    """Full jitter (AWS's "exponential backoff and jitter"): uniform in [0, min(max, base * 2^attempt)]."""
    return rng.uniform(0.0, min(config.backoff_max_s, config.backoff_base_s * 2**attempt))


class RetryBudget:
    """A token bucket: each request deposits `ratio`, each retry takes one, `min_per_s` refills on its own.

    Under a broad outage every first attempt fails; without a budget each would be retried and the load
    on the surviving workers would multiply. The bucket is capped at ten seconds' worth of deposits.
    """

    __slots__ = ("_cap", "_clock", "_last", "_ratio", "_tokens", "config")

    def __init__(self, config: RetryConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._last = clock()
        self._cap = max(1.0, 10.0 * config.budget_min_per_s)
        self._ratio = config.budget_ratio
        self._tokens = self._cap

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._cap, self._tokens + (now - self._last) * self.config.budget_min_per_s)
        self._last = now

    def on_request(self) -> None:
        tokens = self._tokens + self._ratio  # per request: no call
        self._tokens = tokens if tokens < self._cap else self._cap

    def try_spend(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens
