"""Arrival processes: mean rate, burstiness against gamma theory, seeding, and refused settings."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from microserve.bench.arrivals import ArrivalKind, arrival_times, default_kind, interarrival_gaps

N = 5000


def gaps(kind: ArrivalKind, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    return np.fromiter(itertools.islice(interarrival_gaps(kind, rate, burstiness, seed), N), float)


@pytest.mark.parametrize(
    ("kind", "burstiness"),
    [
        (ArrivalKind.FIXED, 1.0),
        (ArrivalKind.POISSON, 1.0),
        (ArrivalKind.GAMMA, 0.25),
        (ArrivalKind.GAMMA, 4.0),
    ],
)
def test_mean_rate_is_the_asked_rate(kind: ArrivalKind, burstiness: float) -> None:
    times = arrival_times(kind, 8.0, burstiness, seed=1, count=N)
    # The standard error of the mean gap is 1/sqrt(burstiness * N) of it: 2.8% at burstiness 0.25.
    assert N / times[-1] == pytest.approx(8.0, rel=0.1 if burstiness < 1 else 0.04)


@pytest.mark.parametrize(
    ("kind", "burstiness", "cv"),
    [
        (ArrivalKind.FIXED, 1.0, 0.0),
        (ArrivalKind.POISSON, 1.0, 1.0),
        (ArrivalKind.GAMMA, 0.25, 2.0),  # burstier than Poisson
        (ArrivalKind.GAMMA, 4.0, 0.5),  # smoother than Poisson
    ],
)
def test_coefficient_of_variation_is_one_over_sqrt_burstiness(
    kind: ArrivalKind, burstiness: float, cv: float
) -> None:
    g = gaps(kind, 5.0, burstiness, seed=2)
    assert g.std() / g.mean() == pytest.approx(cv, abs=0.12 * max(cv, 1.0))


def test_poisson_counts_have_variance_equal_to_their_mean() -> None:
    times = np.asarray(arrival_times(ArrivalKind.POISSON, 10.0, seed=3, count=N))
    counts = np.bincount(times.astype(int))[:-1]  # per whole second; the last second is cut short
    assert counts.mean() == pytest.approx(10.0, rel=0.05)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.2)  # index of dispersion
    # A fixed process has none: every second holds the same count (rate 8: gaps exact in binary).
    fixed = np.bincount(np.asarray(arrival_times(ArrivalKind.FIXED, 8.0, count=N)).astype(int))[1:-1]
    assert set(fixed.tolist()) == {8}


def test_seeded_and_reproducible() -> None:
    a = arrival_times(ArrivalKind.GAMMA, 3.0, 0.5, seed=7, count=100)
    assert a == arrival_times(ArrivalKind.GAMMA, 3.0, 0.5, seed=7, count=100)
    assert a != arrival_times(ArrivalKind.GAMMA, 3.0, 0.5, seed=8, count=100)
    # Poisson is gamma with shape 1: the same seed draws the same process under both names.
    assert arrival_times(ArrivalKind.POISSON, 3.0, seed=7, count=50) == pytest.approx(
        arrival_times(ArrivalKind.GAMMA, 3.0, 1.0, seed=7, count=50)
    )


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_times(ArrivalKind.POISSON, math.inf, count=10) == [0.0] * 10


def test_default_kind_follows_burstiness() -> None:
    assert default_kind(1.0) is ArrivalKind.POISSON
    assert default_kind(0.5) is ArrivalKind.GAMMA


@pytest.mark.parametrize(
    ("kind", "rate", "burstiness", "message"),
    [
        (ArrivalKind.POISSON, 0.0, 1.0, "rate must be positive"),
        (ArrivalKind.GAMMA, 1.0, 0.0, "burstiness must be"),
        (ArrivalKind.GAMMA, 1.0, math.inf, "burstiness must be"),
        (ArrivalKind.POISSON, 1.0, 2.0, "needs --arrival gamma"),
        (ArrivalKind.FIXED, 1.0, 0.5, "needs --arrival gamma"),
    ],
)
def test_bad_settings_fail_at_the_call(
    kind: ArrivalKind, rate: float, burstiness: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        interarrival_gaps(kind, rate, burstiness)
