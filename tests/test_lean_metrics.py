"""The lean counters and histograms expose exactly what prometheus_client's own would, for the same counts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from microserve.lean_metrics import LeanCounter, LeanHistogram
from microserve.metrics_text import TTFT_BUCKETS

observations = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]), st.floats(min_value=0, max_value=1e4) | st.sampled_from(TTFT_BUCKETS)
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(observations)
def test_a_lean_histogram_and_counter_read_as_prometheus_clients_own(seen: list[tuple[str, float]]) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    hist = Histogram("t_seconds", "Doc.", ["route"], buckets=TTFT_BUCKETS, registry=theirs)
    count = Counter("t_requests", "Doc.", ["route", "status"], registry=theirs)
    lean_hist = LeanHistogram("t_seconds", "Doc.", ["route"], TTFT_BUCKETS)
    lean_count = LeanCounter("t_requests", "Doc.", ["route", "status"])
    for family in (lean_hist, lean_count):
        ours.register(family)
    for route, value in seen:
        hist.labels(route).observe(value)
        lean_hist.labels(route).observe(value)
        count.labels(route, "200").inc()
        lean_count.labels(route, "200").inc()
    assert generate_latest(ours) == generate_latest(theirs)


def test_an_unlabelled_histogram_is_exported_from_its_first_cell() -> None:
    registry = CollectorRegistry()
    wait = LeanHistogram("wait_seconds", "Doc.", [], (0.5, 1.0))
    registry.register(wait)
    assert b"wait_seconds_count" not in generate_latest(registry)
    wait.labels().observe(0.7)
    text = generate_latest(registry).decode()
    assert 'wait_seconds_bucket{le="0.5"} 0.0' in text
    assert 'wait_seconds_bucket{le="1.0"} 1.0' in text
    assert 'wait_seconds_bucket{le="+Inf"} 1.0' in text
    assert "wait_seconds_sum 0.7" in text


def test_labels_and_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="ascend"):
        LeanHistogram("h", "Doc.", [], (1.0, 0.5))
    with pytest.raises(ValueError, match="takes labels"):
        LeanCounter("c", "Doc.", ["route"]).labels()
    with pytest.raises(ValueError, match="takes labels"):
        LeanHistogram("h", "Doc.", ["route"], (1.0,)).labels("a", "b")
