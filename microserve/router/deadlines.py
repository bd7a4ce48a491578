"""Deadlines for one attempt on a worker, so a hung or frozen engine costs a request seconds, not the hang.

A stream must show its first byte within `first_byte_s` and then a chunk at least every `stall_s`. Both
follow the engine's own measured step time (a slow model gets longer) and never go below their floors.
"""

from __future__ import annotations

from dataclasses import dataclass

from microserve.router.workers import LoadReport


@dataclass(slots=True, frozen=True)
class DeadlineConfig:
    first_byte_floor_s: float = 5.0  # at least this long for the first byte of a stream
    stall_floor_s: float = 2.0  # at least this long between two chunks of a stream
    first_byte_steps: float = 100.0  # engine steps a request may wait for its first token (queue, prefill)
    stall_steps: float = 25.0  # engine steps between two chunks (other requests' prefill chunks, preemption)
    enabled: bool = True

    def __post_init__(self) -> None:
        if min(self.first_byte_floor_s, self.stall_floor_s) <= 0:
            raise ValueError("the first-byte and stall floors must be positive")
        if min(self.first_byte_steps, self.stall_steps) <= 0:
            raise ValueError("first_byte_steps and stall_steps must be positive")


@dataclass(slots=True, frozen=True)
class AttemptDeadlines:
    first_byte_s: float
    stall_s: float

    def missed(self, first_byte: bool) -> str:
        """What a stream that missed its first-byte deadline (or, `first_byte` False, its stall limit) is."""
        if first_byte:
            return f"no first byte within {self.first_byte_s:.3g} s (the worker is stalled)"
        return f"the stream stalled for {self.stall_s:.3g} s (the worker is stalled)"


NO_DEADLINES = AttemptDeadlines(float("inf"), float("inf"))


def attempt_deadlines(load: LoadReport | None, config: DeadlineConfig) -> AttemptDeadlines:
    """The deadlines of an attempt on a worker that last reported `load` (None: floors only).

    The first byte waits for the requests queued ahead on the engine as well, so its budget grows with
    the reported queue, in batches of the engine's own size.
    """
    if not config.enabled:
        return NO_DEADLINES
    step_s = load.step_s if load is not None and load.step_s else 0.0
    queued_batches = 0.0
    if load is not None and load.max_num_seqs:
        queued_batches = load.waiting / load.max_num_seqs
    first = max(config.first_byte_floor_s, step_s * config.first_byte_steps * (1.0 + queued_batches))
    stall = max(config.stall_floor_s, step_s * config.stall_steps)
    return AttemptDeadlines(first, stall)
