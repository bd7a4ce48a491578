"""Issue 15's autoscaling experiment on `microserve simulate`'s virtual clock: a bursty and a diurnal trace,
each served by (a) a fixed fleet sized for the peak and (b) the router's autoscaler; TTFT-SLO attainment
(requests answered with TTFT <= --slo; failures count as misses), TTFT p99 and engine-seconds.

Usage: python benchmarks/autoscale_experiment.py [--out docs/results/autoscale.json] [--plots docs/images]
"""

from __future__ import annotations

import argparse
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
PEAK_REPLICAS = 8  # 20 requests/s at about 2.5 per replica (docs/simulator.md's moderate load)


def one(trace: str, fleet: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        args = parser.parse_args([*COMMON, *TRACES[trace], *fleet, "--out", str(out)])
        from rich.console import Console

        simulate.run(args, Console(file=open("/dev/null", "w")))  # noqa: SIM115
        return json.loads(out.read_text())["runs"][0]  # type: ignore[no-any-return]


def measure(run: dict[str, Any], slo_s: float) -> dict[str, Any]:
    requests = run["requests"]
    ttfts = [t for t, e in zip(requests["ttfts"], requests["errors"], strict=True) if not e]
    total = len(requests["ttfts"])
    within = sum(1 for t in ttfts if t <= slo_s)
    return {
        "requests": total,
        "failed": total - len(ttfts),
        "attainment": within / total,
        "p99_ttft_s": float(np.percentile(ttfts, 99)) if ttfts else None,
        "engine_seconds": run["engine_seconds"],
        "timeline": run.get("replicas_timeline"),
        "start_times": requests["start_times"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--slo", type=float, default=1.0, help="TTFT target in seconds (1)")
    p.add_argument("--startup", type=float, default=10.0, help="seconds a new replica takes to start (10)")
    p.add_argument("--target", type=float, default=6.0, help="--scale-target: requests per replica (6)")
    p.add_argument("--out", default=None)
    p.add_argument("--plots", default=None)
    a = p.parse_args()
    scaled = ["--autoscale", f"1:{PEAK_REPLICAS}", "--engine-startup", str(a.startup),
              "--scale-target", str(a.target), "--scale-down-after", "30",
              "--scale-up-cooldown", "2"]  # fmt: skip
    fleets = {"fixed": ["--replicas", str(PEAK_REPLICAS)], "autoscaled": scaled}
    results: dict[str, dict[str, Any]] = {}
    for trace in TRACES:
        for name, fleet in fleets.items():
            results[f"{trace}/{name}"] = measure(one(trace, fleet), a.slo)
    print(f"machine: {describe_machine()}; date {dt.date.today()}")
    print(f"TTFT SLO {a.slo:g} s; replica start-up {a.startup:g} s; scale target {a.target:g}")
    head = ("run", "requests", "failed", "within SLO", "p99 TTFT", "engine-s", "vs fixed")
    print("{:22} {:>8} {:>6} {:>10} {:>9} {:>9} {:>8}".format(*head))
    for key, r in results.items():
        fixed = results[key.split("/")[0] + "/fixed"]["engine_seconds"]
        p99 = "-" if r["p99_ttft_s"] is None else f"{r['p99_ttft_s']:.2f} s"
        print(f"{key:22} {r['requests']:8d} {r['failed']:6d} {100 * r['attainment']:9.2f}% {p99:>9} "
              f"{r['engine_seconds']:9.0f} {r['engine_seconds'] / fixed:8.2f}")  # fmt: skip
    if a.out:
        slim = {k: {f: v for f, v in r.items() if f != "start_times"} for k, r in results.items()}
        meta = {
            "machine": describe_machine(),
            "date": str(dt.date.today()),
            "slo_s": a.slo,
            "startup_s": a.startup,
            "target": a.target,
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
        ax.axhline(PEAK_REPLICAS, color="C2", linestyle="--", label="replicas (fixed)")
        share = r["engine_seconds"] / results[trace + "/fixed"]["engine_seconds"]
        ax.set_title(f"{trace}: {100 * r['attainment']:.1f}% within SLO, {share:.0%} of fixed engine-s")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("virtual seconds")
    fig.tight_layout()
    fig.savefig(folder / "autoscale-traces.png", dpi=100)
    print(f"plot: {folder / 'autoscale-traces.png'}")


if __name__ == "__main__":
    sys.exit(main())
