"""Issue 15's autoscaling experiment on `microserve simulate`'s virtual clock: a bursty and a diurnal trace,
each served by (a) a fixed fleet sized for the peak, (b) the router's autoscaler (with a replica start-up
of --startup seconds, and again with a fast wake of --fast-startup seconds) and (c) the autoscaler with
prefix hand-off on scale-down; TTFT-SLO attainment (requests answered with TTFT <= --slo; failures count
as misses), TTFT p99 and engine-seconds. (c) runs on a prefix-heavy workload (shared documents, the
prefix-aware policy on token ids) next to (a) and (b) on the same workload, and adds the prefix hit rate.

Usage: python benchmarks/autoscale_experiment.py [--out docs/results/autoscale.json] [--plots docs/images]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from microserve.machine import describe_machine
from microserve.simulator import cli as simulate

COMMON = ["--endpoint", "completions", "--prompt-format", "token-ids", "--input-len", "128",
          "--output-len", "32", "--admission", "--max-queue-wait", "30", "--seed", "1"]  # fmt: skip
TRACES = {
    "bursty": [
        "--load-shape",
        "bursty",
        "--request-rate",
        "2",
        "--peak-rate",
        "20",
        "--period",
        "300",
        "--burst-len",
        "60",
        "--duration",
        "900",
    ],
    "diurnal": [
        "--load-shape",
        "diurnal",
        "--request-rate",
        "2",
        "--peak-rate",
        "20",
        "--period",
        "900",
        "--duration",
        "900",
    ],
}
# The prefix-heavy workload of (c): 32 documents of 400 words, 8 questions each, routed prefix-aware.
PREFIXED = ["--endpoint", "completions", "--workload", "shared-doc", "--documents", "32",
            "--document-len", "400", "--questions", "8", "--output-len", "32", "--policy", "prefix_aware",
            "--policy-options", '{"tokens": true}', "--admission", "--max-queue-wait", "30",
            "--seed", "1"]  # fmt: skip
PEAK_REPLICAS = 8  # 20 requests/s at about 2.5 per replica (docs/simulator.md's moderate load)
BURST_REPLICAS = 12  # the autoscaler may go past the peak's fleet to drain a burst's backlog
HANDOFF_TOKENS = 8192


def scaled(startup: float, target: float, lookahead: float, low: int = 1) -> list[str]:
    """The autoscaler's settings: down one replica at a time after 10 s under 70% of the target; up for
    the load expected `lookahead` seconds ahead; `low` replicas kept as a warm spare."""
    return ["--autoscale", f"{low}:{BURST_REPLICAS}", "--engine-startup", str(startup),
            "--scale-target", str(target), "--scale-down-after", "10", "--scale-down-step", "1",
            "--scale-down-ratio", "0.7", "--scale-up-cooldown", "2",
            "--scale-lookahead", str(lookahead)]  # fmt: skip


def one(trace: str, fleet: list[str], workload: list[str] = COMMON) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        args = parser.parse_args([*workload, *TRACES[trace], *fleet, "--out", str(out)])
        from rich.console import Console

        simulate.run(args, Console(file=open("/dev/null", "w")))  # noqa: SIM115
        return json.loads(out.read_text())["runs"][0]  # type: ignore[no-any-return]


def measure(run: dict[str, Any], slo_s: float) -> dict[str, Any]:
    requests = run["requests"]
    ttfts = [t for t, e in zip(requests["ttfts"], requests["errors"], strict=True) if not e]
    total = len(requests["ttfts"])
    within = sum(1 for t in ttfts if t <= slo_s)
    replicas = run["replicas"]
    served = sum(r["requests"] for r in replicas) or 1
    handoffs = run.get("handoffs", [])
    return {
        "requests": total,
        "failed": total - len(ttfts),
        "attainment": within / total,
        "p99_ttft_s": float(np.percentile(ttfts, 99)) if ttfts else None,
        "mean_ttft_s": float(np.mean(ttfts)) if ttfts else None,
        # The replicas' prompt-token prefix hit rates, weighted by the requests each served.
        "prefix_hit_rate": sum(r["prefix_hit_rate"] * r["requests"] for r in replicas) / served,
        "handoffs": len(handoffs),
        "handoff_tokens": sum(h["sent_tokens"] for h in handoffs),
        "handoff_s": sum(h["seconds"] for h in handoffs),
        "engine_seconds": run["engine_seconds"],
        "timeline": run.get("replicas_timeline"),
        "start_times": requests["start_times"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--slo", type=float, default=1.0, help="TTFT target in seconds (1)")
    p.add_argument("--startup", type=float, default=10.0, help="seconds a new replica takes to start (10)")
    p.add_argument("--fast-startup", type=float, default=2.0, help="a fast wake's start-up in seconds (2)")
    p.add_argument("--target", type=float, default=14.0, help="--scale-target: requests per replica (14)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each in its own process (2)")
    p.add_argument("--out", default=None)
    p.add_argument("--plots", default=None)
    a = p.parse_args()
    handoff = ["--handoff-tokens", str(HANDOFF_TOKENS)]
    fixed = ["--replicas", str(PEAK_REPLICAS)]
    runs: dict[str, tuple[str, list[str], list[str]]] = {}
    slow = scaled(a.startup, a.target, 0.0)
    fast = scaled(a.fast_startup, a.target, a.fast_startup)
    for trace in TRACES:
        runs[f"{trace}/fixed"] = (trace, fixed, COMMON)
        runs[f"{trace}/autoscaled"] = (trace, slow, COMMON)
        runs[f"{trace}/fast-wake"] = (trace, fast, COMMON)
        runs[f"{trace}/docs-fixed"] = (trace, fixed, PREFIXED)
        runs[f"{trace}/docs-autoscaled"] = (trace, slow, PREFIXED)
        runs[f"{trace}/docs-handoff"] = (trace, [*slow, *handoff], PREFIXED)
    for spare in (2, 3, 4):  # the bursty frontier: warm spares that absorb a step while replicas start
        runs[f"bursty/spare-{spare}"] = ("bursty", scaled(a.startup, a.target, 0.0, spare), COMMON)
        runs[f"bursty/fast-spare-{spare}"] = (
            "bursty",
            scaled(a.fast_startup, a.target, a.fast_startup, spare),
            COMMON,
        )
    with concurrent.futures.ProcessPoolExecutor(a.jobs) as pool:
        futures = {key: pool.submit(one, *spec) for key, spec in runs.items()}
        results = {key: measure(f.result(), a.slo) for key, f in futures.items()}
    print(f"machine: {describe_machine()}; date {dt.date.today()}")
    print(f"TTFT SLO {a.slo:g} s; replica start-up {a.startup:g} s (fast wake {a.fast_startup:g} s); "
          f"scale target {a.target:g}")  # fmt: skip
    head = ("run", "requests", "failed", "within SLO", "p99 TTFT", "mean TTFT", "hit rate", "engine-s",
            "vs fixed")  # fmt: skip
    print("{:24} {:>8} {:>6} {:>10} {:>9} {:>9} {:>8} {:>9} {:>8}".format(*head))
    for key, r in results.items():
        trace, name = key.split("/")
        peer = results[f"{trace}/{'docs-fixed' if name.startswith('docs') else 'fixed'}"]["engine_seconds"]
        p99 = "-" if r["p99_ttft_s"] is None else f"{r['p99_ttft_s']:.2f} s"
        mean = "-" if r["mean_ttft_s"] is None else f"{r['mean_ttft_s']:.3f} s"
        print(f"{key:24} {r['requests']:8d} {r['failed']:6d} {100 * r['attainment']:9.2f}% {p99:>9} "
              f"{mean:>9} {100 * r['prefix_hit_rate']:7.1f}% {r['engine_seconds']:9.0f} "
              f"{r['engine_seconds'] / peer:8.2f}")  # fmt: skip
    if a.out:
        slim = {k: {f: v for f, v in r.items() if f != "start_times"} for k, r in results.items()}
        meta = {
            "machine": describe_machine(),
            "date": str(dt.date.today()),
            "slo_s": a.slo,
            "startup_s": a.startup,
            "fast_startup_s": a.fast_startup,
            "target": a.target,
            "handoff_tokens": HANDOFF_TOKENS,
        }
        Path(a.out).write_text(json.dumps({"meta": meta, "results": slim}, indent=1))
    if a.plots:
        plot(results, Path(a.plots))
    return 0


def plot(results: dict[str, dict[str, Any]], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax, trace in zip(axes, TRACES, strict=True):
        r = results[f"{trace}/autoscaled"]
        starts = np.array(r["start_times"]) - min(r["start_times"])
        counts, edges = np.histogram(starts, bins=np.arange(0, starts.max() + 10, 10))
        ax.bar(edges[:-1], counts / 10, width=10, align="edge", alpha=0.3, label="arrivals (requests/s)")
        t, n = zip(*r["timeline"], strict=True)
        ax.step([*t, edges[-1]], [*n, n[-1]], where="post", color="C1", label="replicas (autoscaled)")
        t, n = zip(*results[f"{trace}/fast-wake"]["timeline"], strict=True)
        ax.step(
            [*t, edges[-1]], [*n, n[-1]], where="post", color="C3", alpha=0.7, label="replicas (fast wake)"
        )
        ax.axhline(PEAK_REPLICAS, color="C2", linestyle="--", label="replicas (fixed)")
        share = r["engine_seconds"] / results[trace + "/fixed"]["engine_seconds"]
        ax.set_title(f"{trace}: {100 * r['attainment']:.1f}% within SLO, {share:.0%} of fixed engine-s")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("virtual seconds")
    fig.tight_layout()
    fig.savefig(folder / "autoscale-traces.png", dpi=100)
    print(f"plot: {folder / 'autoscale-traces.png'}")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, trace in enumerate(TRACES):
        fixed = results[f"{trace}/fixed"]["engine_seconds"]
        points = {k.split("/")[1]: r for k, r in results.items() if k.startswith(trace + "/")}
        points = {k: r for k, r in points.items() if not k.startswith("docs")}
        xs = [r["engine_seconds"] / fixed for r in points.values()]
        ys = [100 * r["attainment"] for r in points.values()]
        ax.scatter(xs, ys, color=f"C{i}", label=trace)
        for name, x, y in zip(points, xs, ys, strict=True):
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(99, color="grey", linestyle=":")
    ax.axvline(0.6, color="grey", linestyle=":")
    ax.set_xlabel("engine-seconds / fixed fleet's")
    ax.set_ylabel("% of requests within the TTFT SLO")
    ax.set_title("goal: top left of the dotted lines (>= 99% at <= 0.60)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "autoscale-frontier.png", dpi=100)
    print(f"plot: {folder / 'autoscale-frontier.png'}")


if __name__ == "__main__":
    sys.exit(main())
