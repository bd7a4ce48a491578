"""Benchmark reports: the summary table, the results JSON, and PNG plots.

Plots are latency CDFs per run and, when rates are swept, throughput and latency against request rate."""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from matplotlib.figure import Figure
from rich.table import Table

from microserve.bench.metrics import Summary, percentile_name, request_tpot
from microserve.bench.runner import RunResult

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))


@dataclass(frozen=True, slots=True)
class RunReport:
    """A run and its metrics, side by side."""

    result: RunResult
    summary: Summary

    @property
    def rate_label(self) -> str:
        rate = self.result.config.request_rate
        return "inf" if math.isinf(rate) else f"{rate:g}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def summary_table(reports: Sequence[RunReport], title: str = "microserve bench") -> Table:
    """One column per run, rows as vLLM prints them."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for r in reports:
        table.add_column(f"rate {r.rate_label}", justify="right")

    def row(label: str, values: list[str], end_section: bool = False) -> None:
        table.add_row(label, *values, end_section=end_section)

    s = [r.summary for r in reports]
    concurrency = [r.result.config.max_concurrency for r in reports]
    row("Successful requests", [str(x.completed) for x in s])
    row("Failed requests", [str(x.failed) for x in s])
    if any(x.skipped for x in s):
        row("Turns skipped after a failure", [str(x.skipped) for x in s])
    row("Maximum request concurrency", ["—" if c is None else str(c) for c in concurrency])
    row("Benchmark duration (s)", [f"{x.duration_s:.2f}" for x in s])
    row("Total input tokens", [str(x.total_input_tokens) for x in s])
    row("Total generated tokens", [str(x.total_output_tokens) for x in s])
    row("Request throughput (req/s)", [f"{x.request_throughput:.2f}" for x in s])
    if any(x.request_goodput is not None for x in s):
        slos = ", ".join(f"{k} ≤ {v:g} ms" for k, v in s[0].slos.items())
        row(f"Request goodput (req/s): {slos}", [_ms(x.request_goodput) for x in s])
    row("Output token throughput (tok/s)", [f"{x.output_throughput:.2f}" for x in s])
    row("Total token throughput (tok/s)", [f"{x.total_token_throughput:.2f}" for x in s], end_section=True)
    for key, name in LATENCIES:
        dists = [getattr(x, key) for x in s]
        row(f"Mean {name} (ms)", [_ms(d.mean if d else None) for d in dists])
        row(f"Median {name} (ms)", [_ms(d.median if d else None) for d in dists])
        pcts = s[0].percentiles
        for i, p in enumerate(pcts):
            values = [_ms(d.percentiles[p] if d else None) for d in dists]
            table.add_row(
                f"{percentile_name(p).upper()} {name} (ms)", *values, end_section=i == len(pcts) - 1
            )
    return table


def error_lines(reports: Sequence[RunReport], limit: int = 10) -> list[str]:
    """The distinct errors of failed requests, most frequent first, per run."""
    lines = []
    for r in reports:
        for message, count in list(r.summary.errors.items())[:limit]:
            lines.append(f"rate {r.rate_label}: {count}x {message}")
    return lines


def run_dict(report: RunReport) -> dict[str, Any]:
    """One run: its load, its metrics under vLLM's keys, and every request's raw timings (seconds)."""
    result, records = report.result, report.result.records
    t0 = min((r.start for r in records), default=0.0)
    return {
        **result.config.describe(),
        "workload": result.workload,
        "started_at": result.started_at,
        **report.summary.to_dict(),
        "requests": {
            "input_lens": [r.prompt_len for r in records],
            "output_lens": [r.output_tokens if r.success else 0 for r in records],
            "ttfts": [r.ttft if r.success else None for r in records],
            "tpots": [request_tpot(r) if r.success else None for r in records],
            "itls": [r.itl if r.success else [] for r in records],
            "latencies": [r.latency if r.success else None for r in records],
            "start_times": [r.start - t0 for r in records],
            "queue_times": [r.queue_time for r in records],
            "conversations": [r.request.conversation for r in records],
            "turns": [r.request.turn for r in records],
            "errors": [None if r.success else r.error for r in records],
        },
    }


def results_dict(reports: Sequence[RunReport], meta: dict[str, Any]) -> dict[str, Any]:
    """The whole results file: what was measured where and when, then one entry per run."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "host": platform.node(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        **meta,
        "runs": [run_dict(r) for r in reports],
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def _ecdf(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(np.asarray(values, dtype=np.float64) * 1000.0)
    return x, np.arange(1, len(x) + 1) / len(x)


def plot_latency_cdfs(reports: Sequence[RunReport], path: Path) -> Path:
    """TTFT, TPOT and E2E latency CDFs, one curve per run."""
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (key, name) in zip(
        axes, (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E latency")), strict=True
    ):
        for r in reports:
            ok = [x for x in r.result.records if x.success]
            values = {
                "ttft": [x.ttft for x in ok],
                "tpot": [t for x in ok if (t := request_tpot(x)) is not None],
                "e2el": [x.latency for x in ok],
            }[key]
            if values:
                x, y = _ecdf(values)
                ax.step(x, y, where="post", label=f"rate {r.rate_label}")
        ax.set_title(f"{name} CDF")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def plot_rate_sweep(reports: Sequence[RunReport], directory: Path) -> list[Path]:
    """Throughput and latency against the configured request rate ('inf' plotted last, evenly spaced)."""
    labels = [r.rate_label for r in reports]
    x = np.arange(len(reports))
    s = [r.summary for r in reports]

    fig = Figure(figsize=(10, 4), layout="constrained")
    req_ax, tok_ax = fig.subplots(1, 2)
    req_ax.plot(x, [v.request_throughput for v in s], marker="o", label="request throughput")
    if any(v.request_goodput is not None for v in s):
        req_ax.plot(x, [v.request_goodput or 0.0 for v in s], marker="s", label="goodput")
    req_ax.set_ylabel("requests/s")
    tok_ax.plot(x, [v.output_throughput for v in s], marker="o", label="output tokens")
    tok_ax.plot(x, [v.total_token_throughput for v in s], marker="s", label="input + output tokens")
    tok_ax.set_ylabel("tokens/s")
    for ax, title in ((req_ax, "Request throughput"), (tok_ax, "Token throughput")):
        ax.set_title(title)
        ax.set_xticks(x, labels)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    throughput = directory / "throughput_vs_rate.png"
    fig.savefig(throughput, dpi=100)

    fig = Figure(figsize=(13, 4), layout="constrained")
    p_top = max(s[0].percentiles, default=None)
    for ax, (key, name) in zip(fig.subplots(1, 3), (LATENCIES[0], LATENCIES[1], LATENCIES[3]), strict=True):
        dists = [getattr(v, key) for v in s]
        ax.plot(x, [d.mean if d else np.nan for d in dists], marker="o", label="mean")
        ax.plot(x, [d.median if d else np.nan for d in dists], marker="^", label="median")
        if p_top is not None:
            tail = [d.percentiles[p_top] if d else np.nan for d in dists]
            ax.plot(x, tail, marker="s", label=percentile_name(p_top))
        ax.set_title(f"{name} against request rate")
        ax.set_xticks(x, labels)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    latency = directory / "latency_vs_rate.png"
    fig.savefig(latency, dpi=100)
    return [throughput, latency]


def write_plots(reports: Sequence[RunReport], directory: str | Path) -> list[Path]:
    """Every plot that applies: the CDFs always, the rate plots when more than one rate ran."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_latency_cdfs(reports, out / "latency_cdf.png")]
    if len(reports) > 1:
        paths += plot_rate_sweep(reports, out)
    return paths
