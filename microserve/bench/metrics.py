"""Serving metrics from request records, defined as vLLM's `vllm bench serve` defines them.

TTFT, TPOT (first token excluded), ITL, end-to-end latency, throughput, goodput under SLOs, and failures."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from microserve.bench.sender import RequestRecord

SLO_METRICS = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (90.0, 99.0)


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0}: SLOs in milliseconds."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"--goodput takes NAME:MILLISECONDS pairs, got {item!r}")
        if name not in SLO_METRICS:
            raise ValueError(f"--goodput metric must be one of {', '.join(SLO_METRICS)}, got {name!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {name} needs a number of milliseconds, got {value!r}") from None
        if not ms >= 0 or math.isinf(ms):
            raise ValueError(f"--goodput {name} must be a finite non-negative number, got {value!r}")
        slos[name] = ms
    return slos


def parse_percentiles(text: str) -> tuple[float, ...]:
    """'50,90,99.9' -> (50.0, 90.0, 99.9), each in [0, 100]."""
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--percentiles takes numbers like 50,90,99, got {text!r}") from None
    if not values or any(not 0 <= p <= 100 for p in values):
        raise ValueError(f"--percentiles must be numbers in [0, 100], got {text!r}")
    return values


def percentile_name(p: float) -> str:
    """99 -> 'p99', 99.9 -> 'p99.9' (vLLM's result keys)."""
    return f"p{int(p)}" if p == int(p) else f"p{p:g}"


@dataclass(frozen=True, slots=True)
class Distribution:
    """Mean, median, standard deviation and chosen percentiles of one latency, in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: dict[float, float]
    count: int

    @classmethod
    def of_seconds(cls, values: Sequence[float], percentiles: Sequence[float]) -> Distribution | None:
        """None for no values (vLLM reports 0 there, which reads like a measurement)."""
        if not values:
            return None
        ms = np.asarray(values, dtype=np.float64) * 1000.0
        # numpy's default (linear interpolation between closest ranks) and population std, as vLLM.
        return cls(
            mean=float(ms.mean()),
            median=float(np.median(ms)),
            std=float(ms.std()),
            percentiles={p: float(np.percentile(ms, p)) for p in percentiles},
            count=len(ms),
        )


def request_tpot(record: RequestRecord) -> float | None:
    """Time per output token after the first: (e2e - ttft) / (output_tokens - 1); None for one token."""
    if record.output_tokens <= 1:
        return None
    return (record.latency - record.ttft) / (record.output_tokens - 1)


def is_good(record: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a completed request met every SLO (ms). A one-token answer counts as TPOT 0, as in vLLM."""
    values = {"ttft": record.ttft, "tpot": request_tpot(record) or 0.0, "e2el": record.latency}
    return all(values[name] <= slo / 1000.0 for name, slo in slos.items())


@dataclass(frozen=True, slots=True)
class Summary:
    """One run's metrics. Throughputs divide by the run's duration: first send to last answer."""

    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: float | None
    slos: dict[str, float]
    ttft: Distribution | None
    tpot: Distribution | None
    itl: Distribution | None
    e2el: Distribution | None
    percentiles: tuple[float, ...]
    errors: dict[str, int] = field(default_factory=dict)
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Flat keys under vLLM's names (mean_ttft_ms, p99_itl_ms, request_goodput, ...)."""
        out: dict[str, Any] = {
            "duration": self.duration_s,
            "completed": self.completed,
            "failed": self.failed,
            "skipped": self.skipped,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "goodput_slos_ms": self.slos or None,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
        }
        for name in ("ttft", "tpot", "itl", "e2el"):
            dist: Distribution | None = getattr(self, name)
            out[f"mean_{name}_ms"] = dist.mean if dist else None
            out[f"median_{name}_ms"] = dist.median if dist else None
            out[f"std_{name}_ms"] = dist.std if dist else None
            for p in self.percentiles:
                out[f"{percentile_name(p)}_{name}_ms"] = dist.percentiles[p] if dist else None
        out["errors"] = self.errors
        return out


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    slos: dict[str, float] | None = None,
    skipped: int = 0,
) -> Summary:
    """Metrics over one run's records; failed requests count only in `failed` and `errors`."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    slos = slos or {}
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [t for r in ok if (t := request_tpot(r)) is not None]
    good = sum(is_good(r, slos) for r in ok) if slos else None
    return Summary(
        duration_s=duration_s,
        completed=len(ok),
        failed=len(failed),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration_s,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        request_goodput=None if good is None else good / duration_s,
        slos=dict(slos),
        ttft=Distribution.of_seconds([r.ttft for r in ok], percentiles),
        tpot=Distribution.of_seconds(tpots, percentiles),
        # ITL pools every gap of every request: long answers weigh more, as in vLLM.
        itl=Distribution.of_seconds([gap for r in ok for gap in r.itl], percentiles),
        e2el=Distribution.of_seconds([r.latency for r in ok], percentiles),
        percentiles=tuple(percentiles),
        errors=dict(Counter(r.error or "no generated token arrived" for r in failed).most_common()),
        skipped=skipped,
    )
