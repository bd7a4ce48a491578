"""Fair sharing on the simulator's virtual clock: the router's own admission queue and fair share
(`router/fair_share.py`), one replica costed as the bundled model on this machine, and no load generator
competing for the CPU, so the figures are the policy's, not the machine's noise.

The scenario of benchmarks/fairness.py: capacity C measured closed-loop at the concurrency limit, a quiet
tenant at 0.25 C (half its share) alone, then beside a noisy tenant at 5 C (ten times its share), with fair
share and with FIFO (--no-fair-share); then beside two noisy tenants. Several seeds; the quiet tenant's TTFT
p99 beside the noisy ones over its p99 alone (goal: <= 1.5).

Usage: python benchmarks/fairness_sim.py [--duration 120] [--seeds 3] [--out docs/results/fairness-sim.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import shlex
import statistics
import tempfile
from pathlib import Path

from microserve.cli import main
from microserve.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
FLEET = (
    f"--replicas 1 --profile {ROOT / 'docs/profiles/smollm2-135m-fp32-2threads.json'} --max-concurrent 4 "
    "--input-len 40 --output-len 16"
)


def simulate(flags: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(["simulate", *shlex.split(f"{FLEET} {flags}"), "--out", str(out)])
        if code != 0:
            raise SystemExit(f"simulate failed: {flags}")
        [run] = json.loads(out.read_text())["runs"]
        return run


def capacity(duration: float) -> float:
    run = simulate(f"--request-rate inf --max-concurrency 4 --duration {duration}")
    return run["completed"] / run["duration"]


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="virtual seconds per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    c = capacity(30.0)
    quiet, noisy, noisy2 = f"quiet:{0.25 * c:.3f}", f"noisy:{5 * c:.3f}", f"noisy2:{5 * c:.3f}"
    scenarios = {
        "quiet alone": f"--tenant {quiet}",
        "beside the noisy tenant, fair share": f"--tenant {quiet} --tenant {noisy}",
        "beside the noisy tenant, FIFO": f"--tenant {quiet} --tenant {noisy} --no-fair-share",
        "beside two noisy tenants, fair share": f"--tenant {quiet} --tenant {noisy} --tenant {noisy2}",
    }
    rows: dict[str, list[dict]] = {name: [] for name in scenarios}
    for seed in range(args.seeds):
        for name, flags in scenarios.items():
            run = simulate(f"{flags} --duration {args.duration} --seed {seed}")
            rows[name].append({row["tenant"]: row for row in run["tenants"]})
    machine = describe_machine()
    print(f"capacity C = {c:.2f} requests/s; {args.seeds} seeds x {args.duration:g} virtual s; {machine}")
    columns = ("quiet sent", "quiet refused", "quiet TTFT p50", "quiet TTFT p99", "p99 vs alone")
    columns += ("noisy refused",)
    print(f"| run | {' | '.join(columns)} |")
    print("|---|---|---|---|---|---|---|")
    alone = [r["quiet"]["ttft_ms"]["p99"] for r in rows["quiet alone"]]
    result = {"capacity_rps": c, "date": dt.date.today().isoformat(), "machine": machine, "runs": {}}
    for name, runs in rows.items():
        q = [r["quiet"] for r in runs]
        p99 = [x["ttft_ms"]["p99"] if x["ttft_ms"] else float("nan") for x in q]
        ratios = [p / a for p, a in zip(p99, alone, strict=True)]
        noisy_refused = [sum(v["refused"] for k, v in r.items() if k != "quiet") for r in runs]
        noisy_sent = [sum(v["sent"] for k, v in r.items() if k != "quiet") for r in runs]
        print(
            f"| {name} | {sum(x['sent'] for x in q)} | {sum(x['refused'] for x in q)} | "
            f"{statistics.median(x['ttft_ms']['median'] for x in q if x['ttft_ms']):.0f} ms | "
            f"{statistics.median(p99):.0f} ms | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | "
            + (f"{sum(noisy_refused)} of {sum(noisy_sent)} |" if sum(noisy_sent) else "- |")
        )
        result["runs"][name] = runs
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main_()
