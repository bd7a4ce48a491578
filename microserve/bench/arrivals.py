"""Request arrival processes: the gaps between sends, at a fixed rate, Poisson, or gamma with burstiness.

Pure and seeded: the same arguments always give the same gaps, so two runs offer the server the same load."""

from __future__ import annotations

import math
from collections.abc import Iterator
from enum import StrEnum

import numpy as np


class ArrivalKind(StrEnum):
    FIXED = "fixed"
    POISSON = "poisson"
    GAMMA = "gamma"


def default_kind(burstiness: float) -> ArrivalKind:
    """vLLM's convention: burstiness 1 is a Poisson process, any other value a gamma process."""
    return ArrivalKind.POISSON if burstiness == 1.0 else ArrivalKind.GAMMA


def check_arrival(kind: ArrivalKind, rate: float, burstiness: float) -> None:
    """Refuse contradictory settings rather than silently ignoring one of them."""
    if not rate > 0:
        raise ValueError(f"request rate must be positive or inf, got {rate}")
    if not burstiness > 0 or math.isinf(burstiness):
        raise ValueError(f"burstiness must be a positive finite number, got {burstiness}")
    if kind is not ArrivalKind.GAMMA and burstiness != 1.0:
        raise ValueError(f"--burstiness {burstiness} needs --arrival gamma (it shapes the gamma gaps)")


def interarrival_gaps(
    kind: ArrivalKind, rate: float, burstiness: float = 1.0, seed: int = 0, *, batch: int = 1024
) -> Iterator[float]:
    """An endless stream of gaps in seconds; the i-th request goes out at the sum of the first i+1 gaps.

    Gamma gaps have shape `burstiness` and scale 1/(rate*burstiness): the mean stays 1/rate while the
    coefficient of variation is 1/sqrt(burstiness), so values below 1 make bursts and above 1 smooth them.
    At rate inf every gap is 0: all requests are offered at once (max concurrency then sets the pace).
    """
    check_arrival(kind, rate, burstiness)  # here, not in the generator, so bad settings fail at the call
    return _gaps(kind, rate, burstiness, seed, batch)


def _gaps(kind: ArrivalKind, rate: float, burstiness: float, seed: int, batch: int) -> Iterator[float]:
    if math.isinf(rate):
        while True:
            yield 0.0
    if kind is ArrivalKind.FIXED:
        while True:
            yield 1.0 / rate
    rng = np.random.default_rng(seed)
    shape = 1.0 if kind is ArrivalKind.POISSON else burstiness
    scale = 1.0 / (rate * shape)
    while True:
        # Drawn in batches: one numpy call per gap would cost more than the gap at high rates.
        yield from rng.gamma(shape, scale, size=batch).tolist()


def arrival_times(
    kind: ArrivalKind, rate: float, burstiness: float = 1.0, seed: int = 0, *, count: int
) -> list[float]:
    """The first `count` send times, seconds after the start of a run."""
    gaps = interarrival_gaps(kind, rate, burstiness, seed)
    return np.cumsum([next(gaps) for _ in range(count)]).tolist()
