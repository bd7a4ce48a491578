"""Arrival traces whose rate changes over time (a day's curve, bursts), for `simulate --load-shape`.

A Poisson process at the peak rate, thinned to rate(t) / peak: an exact non-homogeneous Poisson process.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from enum import StrEnum


class LoadShape(StrEnum):
    DIURNAL = "diurnal"  # a smooth day: base at t=0, peak at half the period
    BURSTY = "bursty"  # base, with bursts at the peak for `burst_s` at the start of each period


def rate_function(
    shape: LoadShape, base: float, peak: float, period_s: float, burst_s: float
) -> Callable[[float], float]:
    if not 0 <= base <= peak or peak <= 0 or period_s <= 0 or not 0 < burst_s <= period_s:
        raise ValueError("need 0 <= base rate <= peak rate, peak > 0, period > 0 and 0 < burst <= period")
    if shape is LoadShape.DIURNAL:
        return lambda t: base + (peak - base) * (1 - math.cos(2 * math.pi * t / period_s)) / 2
    offset = period_s / 2 - burst_s / 2  # bursts centred in each period, after a quiet start
    return lambda t: peak if offset <= t % period_s < offset + burst_s else base


def shaped_gaps(rate: Callable[[float], float], peak: float, seed: int = 0) -> Iterator[float]:
    """Endless gaps between arrivals of a Poisson process whose rate at time t is `rate(t)` <= `peak`."""
    rng = random.Random(seed)
    t = last = 0.0
    while True:
        t += rng.expovariate(peak)
        if rng.random() * peak < rate(t):
            yield t - last
            last = t
