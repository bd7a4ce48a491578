"""Benchmark metrics against hand-computed values on synthetic records (vLLM's definitions)."""

from __future__ import annotations

import pytest

from microserve.bench.metrics import (
    Distribution,
    parse_goodput,
    parse_percentiles,
    percentile_name,
    request_tpot,
    summarize,
)
from microserve.bench.sender import RequestRecord
from microserve.bench.workloads import BenchRequest


def rec(
    i: int, start: float, chunks: list[float], out: int, prompt: int, error: str | None = None
) -> RequestRecord:
    r = RequestRecord(BenchRequest(i, 8, prompt="x"), arrival=start, start=start)
    r.chunk_times, r.output_tokens, r.prompt_len, r.error = chunks, out, prompt, error
    return r


@pytest.fixture
def records() -> list[RequestRecord]:
    return [
        rec(0, 0.0, [0.1, 0.15, 0.25, 0.30], out=4, prompt=10),  # TTFT 100, TPOT 200/3, ITL 50 100 50
        rec(1, 1.0, [1.2, 1.3], out=5, prompt=20),  # two chunks, five tokens: TPOT 100/4 = 25, ITL 100
        rec(2, 2.0, [2.05], out=1, prompt=30),  # one token: no TPOT, no ITL
        rec(3, 2.5, [], out=0, prompt=0, error="HTTP 503: overloaded"),
        rec(4, 2.6, [2.7], out=1, prompt=5, error="HTTP 503: overloaded"),  # failed mid-stream
    ]


def test_per_request_definitions(records: list[RequestRecord]) -> None:
    a, b, c = records[:3]
    assert (a.ttft, a.latency) == pytest.approx((0.1, 0.3))
    assert a.itl == pytest.approx([0.05, 0.1, 0.05])
    # TPOT excludes the first token: (e2e - ttft) / (tokens - 1).
    assert request_tpot(a) == pytest.approx(0.2 / 3)
    assert request_tpot(b) == pytest.approx(0.1 / 4)
    assert b.itl == pytest.approx([0.1])  # per chunk, not per token
    assert request_tpot(c) is None and c.itl == []
    assert not records[3].success and not records[4].success


def test_summary_against_hand_computed_values(records: list[RequestRecord]) -> None:
    s = summarize(records, duration_s=4.0, percentiles=(50, 90, 99))
    assert (s.completed, s.failed) == (3, 2)
    assert s.errors == {"HTTP 503: overloaded": 2}
    assert (s.total_input_tokens, s.total_output_tokens) == (60, 10)
    assert s.request_throughput == pytest.approx(0.75)
    assert s.output_throughput == pytest.approx(2.5)
    assert s.total_token_throughput == pytest.approx(17.5)
    assert s.request_goodput is None

    assert s.ttft is not None and s.tpot is not None and s.itl is not None and s.e2el is not None
    # TTFT 100, 200, 50 ms; numpy's linear percentiles: p90 sits 0.8 of the way from 100 to 200.
    assert s.ttft.mean == pytest.approx(350 / 3)
    assert s.ttft.median == pytest.approx(100)
    assert s.ttft.std == pytest.approx((35000 / 9) ** 0.5)  # population standard deviation
    assert s.ttft.percentiles == pytest.approx({50: 100, 90: 180, 99: 198})
    # TPOT only over requests with more than one token: 66.67 and 25 ms.
    assert s.tpot.count == 2
    assert s.tpot.mean == pytest.approx((200 / 3 + 25) / 2)
    assert s.tpot.percentiles[90] == pytest.approx(25 + 0.9 * (200 / 3 - 25))
    # ITL pools every gap: 50, 100, 50, 100.
    assert (s.itl.count, s.itl.mean, s.itl.median, s.itl.percentiles[90]) == pytest.approx((4, 75, 75, 100))
    assert (s.e2el.mean, s.e2el.median) == pytest.approx((650 / 3, 300))


@pytest.mark.parametrize(
    ("slos", "good"),
    [
        ({"ttft": 150, "tpot": 50}, 1),  # a misses TPOT, b misses TTFT; c's single token counts TPOT 0
        ({"ttft": 100}, 2),  # an SLO met exactly is met
        ({"e2el": 100}, 1),
        ({"ttft": 250, "tpot": 70, "e2el": 301}, 3),
        ({"tpot": 0}, 1),
    ],
)
def test_goodput_counts_requests_meeting_every_slo(
    records: list[RequestRecord], slos: dict[str, float], good: int
) -> None:
    s = summarize(records, duration_s=4.0, slos=slos)
    assert s.request_goodput == pytest.approx(good / 4.0)


def test_to_dict_has_vllm_keys(records: list[RequestRecord]) -> None:
    d = summarize(records, 4.0, percentiles=(90, 99.9), slos={"ttft": 500}).to_dict()
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p90", "p99.9"):
            assert isinstance(d[f"{stat}_{name}_ms"], float)
    assert d["request_goodput"] == pytest.approx(0.75)
    assert d["goodput_slos_ms"] == {"ttft": 500}
    assert d["failed"] == 2 and d["errors"] == {"HTTP 503: overloaded": 2}


def test_no_completed_request_gives_no_latency_rather_than_zero() -> None:
    s = summarize([rec(0, 0.0, [], 0, 0, error="timeout after 1 s")], 1.0)
    assert s.ttft is None and s.e2el is None and s.request_throughput == 0
    assert s.to_dict()["p99_ttft_ms"] is None
    assert Distribution.of_seconds([], (99,)) is None


def test_parse_goodput_and_percentiles() -> None:
    assert parse_goodput(["ttft:500", "tpot:50.5", "e2el:0"]) == {"ttft": 500, "tpot": 50.5, "e2el": 0}
    for bad, message in [
        ("ttft", "NAME:MILLISECONDS"),
        ("itl:5", "one of ttft, tpot, e2el"),
        ("ttft:fast", "number of milliseconds"),
        ("ttft:-1", "non-negative"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_goodput([bad])
    assert parse_percentiles("50, 90,99.9") == (50, 90, 99.9)
    for bad in ("", "90,101", "p99"):
        with pytest.raises(ValueError, match="--percentiles"):
            parse_percentiles(bad)
    assert (percentile_name(99), percentile_name(99.9)) == ("p99", "p99.9")
