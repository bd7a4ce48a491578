"""A circuit breaker per worker: passive outlier detection from the outcomes of real requests.

Closed until `failure_threshold` failures in a row, then open (no traffic) for a while that doubles on each
failed trial, then half-open: a few trial requests decide between closed and open again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum


class CircuitState(IntEnum):
    # Ordered by how much traffic passes (the metrics export each state as its own series).
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


# On Python 3.11 reading a member through its class (`CircuitState.CLOSED`) goes through the enum metaclass's
# attribute hook (it defines `__getattr__`): about 60 ns, five times a plain class attribute. Code that
# runs per request compares with these module constants.
CLOSED, HALF_OPEN, OPEN = CircuitState.CLOSED, CircuitState.HALF_OPEN, CircuitState.OPEN


@dataclass(slots=True, frozen=True)
class BreakerConfig:
    failure_threshold: int = 5
    open_s: float = 5.0
    max_open_s: float = 60.0
    half_open_trials: int = 1

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.half_open_trials < 1:
            raise ValueError("failure_threshold and half_open_trials must be at least 1")
        if not 0 < self.open_s <= self.max_open_s:
            raise ValueError("need 0 < open_s <= max_open_s")


class CircuitBreaker:
    __slots__ = (
        "_clock",
        "_open_for",
        "_opened_at",
        "_state",
        "_trials",
        "closed",
        "config",
        "failures",
        "openings",
    )

    def __init__(self, config: BreakerConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config or BreakerConfig()
        self._clock = clock
        self._state = CLOSED
        # Whether the circuit is closed, kept beside the state: what every per-request look at a worker
        # asks, answered without a call (read it, never set it).
        self.closed = True
        self.failures = 0  # consecutive, while closed
        self._opened_at = 0.0
        self._open_for = self.config.open_s
        self._trials = 0  # trial requests in flight while half-open
        self.openings = 0  # times it opened (router replicas publish each new one)

    @property
    def state(self) -> CircuitState:
        if self._state is OPEN and self._clock() - self._opened_at >= self._open_for:
            self._state = HALF_OPEN
            self._trials = 0
        return self._state

    def allows(self) -> bool:
        """May a new request go to this worker now?"""
        if self._state is CLOSED:  # the hot path: no clock read
            return True
        state = self.state
        if state is CLOSED:
            return True
        return state is HALF_OPEN and self._trials < self.config.half_open_trials

    def on_dispatch(self) -> None:
        if self._state is HALF_OPEN:
            self._trials += 1

    def on_release(self) -> None:
        """A request ended; a trial that ended with no verdict (client gone, busy) frees its slot."""
        if self._state is HALF_OPEN and self._trials > 0:
            self._trials -= 1

    def on_success(self) -> None:
        self.failures = 0
        if self._state is not CLOSED:
            self._state = CLOSED
            self.closed = True
            self._open_for = self.config.open_s

    def on_failure(self) -> None:
        state = self.state
        if state is HALF_OPEN:
            # The trial failed: stay away longer this time.
            self._open(min(self._open_for * 2, self.config.max_open_s))
        elif state is CLOSED:
            self.failures += 1
            if self.failures >= self.config.failure_threshold:
                self._open(self.config.open_s)

    def trip(self) -> None:
        """Open now, whatever the count: the worker missed a deadline (it is hung, not merely failing)."""
        if self.state is OPEN:
            return
        half_open = self._state is HALF_OPEN
        self._open(min(self._open_for * 2, self.config.max_open_s) if half_open else self.config.open_s)

    def open_remaining_s(self) -> float:
        """Seconds left before an open circuit turns half-open (0 when not open)."""
        if self.state is not OPEN:
            return 0.0
        return max(0.0, self._open_for - (self._clock() - self._opened_at))

    def open_for(self, seconds: float) -> None:
        """Open for `seconds` from now: another router replica opened this worker's circuit."""
        self._open(seconds)

    def _open(self, seconds: float) -> None:
        self._state = OPEN
        self.closed = False
        self.openings += 1
        self._opened_at = self._clock()
        self._open_for = seconds
        self.failures = 0
