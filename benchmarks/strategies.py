"""Serving strategies compared: data_parallel, pd, pd_balanced(0.1, 0.2) and pd_cache_aware, on a long-prompt
and a multi-turn workload, in simulation at 32 replicas and with real engine processes at small scale.

Parts (all by default):
  sim    `microserve simulate`'s Simulator, 32 replicas, the real model's cost profile, a 10 Gb/s KV link;
         for each PD strategy a prefill:decode split sweep at the heaviest rate, then a rate sweep at the
         best split; and `pd` again over a loopback-speed link (115 MB/s) to show what transfer costs.
  real   8 sim-backend engine processes behind the real router (in-process, on loopback), loaded by
         `microserve bench`'s runner; each point also simulated with the same prompts, side by side.
  torch  2 torch engines (SmolLM2-135M, float32, 1 thread each) behind the real router: long prompts only.

Writes docs/results/strategies-{sim,real}.json and docs/strategies-{long-prompt,multi-turn}.png, and prints
the markdown tables of docs/strategies.md.

Usage: python benchmarks/strategies.py [--sim-only | --real-only] [--no-torch] [--torch-requests N]
       [--quick] [--from-json] [--out-dir docs]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from matplotlib.figure import Figure
from sim_validation import MODEL  # the engines' served model (this script's folder is on sys.path)

from microserve.bench.metrics import Summary, summarize
from microserve.bench.report import write_json
from microserve.bench.runner import RunConfig, run_benchmark
from microserve.bench.sender import RequestRecord, Target
from microserve.bench.workloads import Endpoint, MultiTurnWorkload, RandomWorkload, Workload
from microserve.machine import describe_machine
from microserve.model.loader import resolve_model
from microserve.model.tokenizer import Tokenizer
from microserve.processes import engine_fleet
from microserve.router.app import RouterServer
from microserve.router.config import RouterConfig
from microserve.router.router import Router
from microserve.router.workers import Role, WorkerSpec
from microserve.runner.cost_model import CostModel
from microserve.simulator.host import FleetConfig
from microserve.simulator.replica import ReplicaConfig
from microserve.simulator.run import Simulator
from microserve.tokens import INTERNAL_TOKEN_ENV, generate_token

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "docs/profiles/smollm2-135m-fp32-2threads.json"
LINK_BYTES_PER_S = 1.25e9  # 10 Gb/s Ethernet between replicas
LOOPBACK_BYTES_PER_S = 115e6  # engine to engine over loopback HTTP here (docs/microserving.md)
KV_BLOCKS = 1456  # 1 GiB of float32 KV (the engine's default --kv-cache-memory) in 16-token blocks
SIM_REPLICAS = 32
REAL_ENGINES = 8
TORCH_ENGINES = 2
PERCENTILES = (50.0, 90.0, 99.0)
TOKEN = generate_token()  # the engines' internal token: KV moves only between engines that share it


@dataclass(frozen=True, slots=True)
class Contender:
    """A strategy with its options, as the table names it."""

    label: str
    strategy: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def disaggregated(self) -> bool:
        return self.strategy != "data_parallel"


CONTENDERS = (
    Contender("data_parallel", "data_parallel"),
    Contender("pd", "pd"),
    Contender("pd_balanced(0.1)", "pd_balanced", {"ratio": 0.1}),
    Contender("pd_balanced(0.2)", "pd_balanced", {"ratio": 0.2}),
    Contender("pd_cache_aware", "pd_cache_aware"),
)


@dataclass(frozen=True, slots=True)
class Scenario:
    """A workload, the policy every strategy uses on it, and the loads of each part."""

    name: str
    workload: Workload
    endpoint: Endpoint
    policy: str
    policy_options: dict[str, Any]
    rates: tuple[float, ...]  # simulation, 32 replicas
    requests: int
    splits: tuple[int, ...]  # prefill replicas of 32 tried for each PD strategy
    real_rates: tuple[float, ...]  # 8 engines
    real_requests: tuple[int, ...]  # one count per real rate
    real_prefill: int  # prefill engines of 8 for the PD strategies


LONG_PROMPT = Scenario(
    name="long-prompt",
    workload=RandomWorkload(input_len=3000, output_len=100, range_ratio=0.2, token_ids=True, seed=0),
    endpoint=Endpoint.COMPLETIONS,
    policy="least_connections",
    policy_options={},
    rates=(1.0, 2.0, 3.0, 3.5),
    requests=600,
    splits=(8, 12, 16),
    real_rates=(0.3, 0.6),
    real_requests=(8, 12),
    real_prefill=3,
)
MULTI_TURN = Scenario(
    name="multi-turn",
    workload=MultiTurnWorkload(
        turns=5, system_prompts=4, system_prompt_len=1000, turn_len=100, output_len=100, seed=0
    ),
    endpoint=Endpoint.CHAT,
    policy="prefix_aware",
    policy_options={},
    rates=(2.0, 5.0, 8.0, 10.0),
    requests=600,
    splits=(4, 8, 12),
    real_rates=(0.5, 1.5),
    real_requests=(15, 30),  # 3 and 6 conversations of 5 turns
    real_prefill=1,
)
SCENARIOS = (LONG_PROMPT, MULTI_TURN)


@dataclass(slots=True)
class Point:
    """One measured (or simulated) point: which part, fleet, strategy and load, and its metrics."""

    part: str  # "sim", "sim-loopback", "real", "torch"
    scenario: str
    contender: str
    prefill: int  # prefill replicas (0: data parallel, every replica does both)
    replicas: int
    rate: float
    summary: Summary
    extra: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str, stat: str) -> float:
        dist = getattr(self.summary, name)
        if dist is None:
            return math.nan
        return dist.mean if stat == "mean" else dist.percentiles[float(stat.removeprefix("p"))]

    def to_dict(self) -> dict[str, Any]:
        s = self.summary.to_dict()
        keep = [k for k in s if k.endswith("_ms") and not k.startswith(("std_", "median_"))]
        head = {k: getattr(self, k) for k in ("part", "scenario", "contender", "prefill", "replicas", "rate")}
        counts = ("duration", "completed", "failed", "skipped", "total_input_tokens", "total_output_tokens")
        return {
            **head,
            **{k: s[k] for k in (*counts, "request_throughput", "errors")},
            **{k: s[k] for k in keep},
            **self.extra,
        }


def roles(contender: Contender, replicas: int, prefill: int) -> list[Role]:
    if not contender.disaggregated:
        return [Role.BOTH] * replicas
    return [Role.PREFILL] * prefill + [Role.DECODE] * (replicas - prefill)


def split_label(prefill: int, replicas: int) -> str:
    return f"{prefill}:{replicas - prefill}" if prefill else "all both"


# -- simulation -----------------------------------------------------------------------------------------


def cost_model(bandwidth: float) -> CostModel:
    return dataclasses.replace(CostModel.from_json(PROFILE), transfer_bandwidth_bytes_per_s=bandwidth)


def fleet(contender: Contender, fleet_roles: list[Role], scenario: Scenario, cost: CostModel) -> FleetConfig:
    return FleetConfig(
        roles=tuple(fleet_roles),
        replica=ReplicaConfig(cost, num_blocks=KV_BLOCKS),
        strategy=contender.strategy,
        strategy_options=contender.options,
        policy=scenario.policy,
        policy_options=scenario.policy_options,
    )


def utilization(replicas: list[dict[str, Any]], duration_s: float) -> dict[str, float]:
    """Mean fraction of the run each role's replicas spent in engine steps."""
    by_role: dict[str, list[float]] = {}
    for r in replicas:
        by_role.setdefault(r["role"], []).append(r["busy_s"] / duration_s)
    return {f"busy_{role}": sum(v) / len(v) for role, v in by_role.items()}


def simulate(
    contender: Contender,
    scenario: Scenario,
    fleet_roles: list[Role],
    config: RunConfig,
    tokenizer: Tokenizer,
    cost: CostModel,
    workload: Workload | None = None,
) -> tuple[Summary, dict[str, Any]]:
    """One simulated run on a fresh fleet; the summary and what the fleet did."""
    sim = Simulator(fleet(contender, fleet_roles, scenario, cost), tokenizer, scenario.endpoint)
    run = sim.run(workload or scenario.workload, config, PERCENTILES)
    extra = {
        **utilization(run.replicas, run.summary.duration_s),
        "preemptions": sum(r["preemptions"] for r in run.replicas),
        "retries": run.retries,
        "left_in_engines": sum(r["left_in_engine"] for r in run.replicas),
        "wall_s": run.wall_s,
    }
    if any(r.request.turn for r in run.result.records):
        extra["mean_ttft_ms_by_turn"] = ttft_by_turn(run.result.records)
    return run.summary, extra


def ttft_by_turn(records: Sequence[RequestRecord]) -> list[float]:
    """Mean TTFT (ms) of a conversation's first turn, second turn, ...: where a strategy's TTFT comes from."""
    by_turn: dict[int, list[float]] = {}
    for r in records:
        if r.success and r.request.turn is not None:
            by_turn.setdefault(r.request.turn, []).append(r.ttft * 1000)
    return [sum(v) / len(v) for _, v in sorted(by_turn.items())]


def sim_point(
    part: str,
    contender: Contender,
    scenario: Scenario,
    prefill: int,
    rate: float,
    tokenizer: Tokenizer,
    cost: CostModel,
) -> Point:
    config = RunConfig(request_rate=rate, num_requests=scenario.requests, seed=0)
    fleet_roles = roles(contender, SIM_REPLICAS, prefill)
    summary, extra = simulate(contender, scenario, fleet_roles, config, tokenizer, cost)
    point = Point(part, scenario.name, contender.label, prefill, SIM_REPLICAS, rate, summary, extra)
    log(brief(point))
    return point


def best(points: Sequence[Point]) -> Point:
    """The split that failed fewest requests, then had the lowest mean JCT."""
    return min(points, key=lambda p: (p.summary.failed, p.metric("e2el", "mean")))


def run_sim(scenarios: Sequence[Scenario], tokenizer: Tokenizer) -> list[Point]:
    cost, loopback = cost_model(LINK_BYTES_PER_S), cost_model(LOOPBACK_BYTES_PER_S)
    points: list[Point] = []
    for sc in scenarios:
        top = sc.rates[-1]
        for c in CONTENDERS:
            if not c.disaggregated:
                points += [sim_point("sim", c, sc, 0, r, tokenizer, cost) for r in sc.rates]
                continue
            sweep = [sim_point("sim-split", c, sc, p, top, tokenizer, cost) for p in sc.splits]
            chosen = best(sweep)
            points += [p for p in sweep if p is not chosen]
            chosen.part = "sim"
            points += [sim_point("sim", c, sc, chosen.prefill, r, tokenizer, cost) for r in sc.rates[:-1]]
            points.append(chosen)
            if c.strategy == "pd":
                points += [
                    sim_point("sim-loopback", c, sc, chosen.prefill, r, tokenizer, loopback) for r in sc.rates
                ]
    return points


# -- real engine processes ------------------------------------------------------------------------------


async def measure(
    urls: list[str],
    fleet_roles: list[Role],
    contender: Contender,
    scenario: Scenario,
    workload: Workload,
    config: RunConfig,
) -> Summary:
    """The real router in-process on a loopback port, loaded by bench's runner."""
    router = Router(
        RouterConfig(
            workers=[WorkerSpec(u, role=r) for u, r in zip(urls, fleet_roles, strict=True)],
            strategy=contender.strategy,
            strategy_options=contender.options,
            policy=scenario.policy,
            policy_options=scenario.policy_options,
            internal_token=TOKEN,
        )
    )
    server = RouterServer(router)
    await server.start()
    try:
        target = Target(server.url, MODEL, endpoint=scenario.endpoint)
        result = await run_benchmark(target, workload, config)
    finally:
        await server.stop()
    return summarize(result.records, result.duration_s, PERCENTILES, skipped=result.skipped)


@dataclass(slots=True)
class RealPlan:
    """Which real points to run on one set of engine processes."""

    part: str
    engine_args: list[str]
    engines: int
    scenarios: tuple[Scenario, ...]
    contenders: tuple[Contender, ...]
    rates: dict[str, tuple[float, ...]]
    requests: dict[str, tuple[int, ...]]
    prefill: dict[str, int]
    twin_cost: CostModel | None  # simulate each point beside it with this cost model (sim engines)


def point_workload(workload: Workload, contender: int, rate: int) -> Workload:
    """The prompts of one real point. The engines keep their prefix caches from point to point, so no
    two points may share a prompt; yet strategies should meet the same load at a rate. Random prompts
    keep their lengths (the seed) and move their token ids by the strategy's index, so not one 16-token
    block repeats; multi-turn conversations take a seed of their own (their lengths are fixed in words)."""
    if isinstance(workload, RandomWorkload):
        low, high = workload.token_id_range
        return dataclasses.replace(
            workload.for_run(rate + 1), token_id_range=(low + contender, high + contender)
        )
    return workload.for_run(1 + rate * len(CONTENDERS) + contender)


def real_point(
    plan: RealPlan, urls: list[str], sc: Scenario, c: Contender, rate_index: int, tokenizer: Tokenizer
) -> Point:
    rate, count = plan.rates[sc.name][rate_index], plan.requests[sc.name][rate_index]
    fleet_roles = roles(c, plan.engines, plan.prefill[sc.name])
    workload = point_workload(sc.workload, CONTENDERS.index(c), rate_index)
    config = RunConfig(request_rate=rate, num_requests=count, seed=rate_index)  # same arrivals for all
    started = time.perf_counter()
    summary = asyncio.run(measure(urls, fleet_roles, c, sc, workload, config))
    extra: dict[str, Any] = {"wall_s": time.perf_counter() - started, "load": os.getloadavg()}
    if plan.twin_cost is not None:
        twin, _ = simulate(c, sc, fleet_roles, config, tokenizer, plan.twin_cost, workload)
        extra["sim"] = {k: v for k, v in twin.to_dict().items() if k.endswith("_ms")}
    prefill = plan.prefill[sc.name] if c.disaggregated else 0
    point = Point(plan.part, sc.name, c.label, prefill, plan.engines, rate, summary, extra)
    log(brief(point))
    return point


def run_real(plan: RealPlan, tokenizer: Tokenizer) -> list[Point]:
    with engine_fleet(plan.engines, *plan.engine_args, timeout=600, env={INTERNAL_TOKEN_ENV: TOKEN}) as urls:
        return [
            real_point(plan, urls, sc, c, i, tokenizer)
            for sc in plan.scenarios
            for c in plan.contenders
            for i in range(len(plan.rates[sc.name]))
        ]


def real_plan(scenarios: tuple[Scenario, ...], profile_path: Path) -> RealPlan:
    args = ["--backend", "sim", "--sim-profile", str(profile_path), "--num-kv-blocks", str(KV_BLOCKS)]
    return RealPlan(
        part="real",
        engine_args=list(args),
        engines=REAL_ENGINES,
        scenarios=scenarios,
        contenders=CONTENDERS,
        rates={sc.name: sc.real_rates for sc in scenarios},
        requests={sc.name: sc.real_requests for sc in scenarios},
        prefill={sc.name: sc.real_prefill for sc in scenarios},
        twin_cost=cost_model(LINK_BYTES_PER_S),
    )


def torch_plan(requests: int, rate: float) -> RealPlan:
    return RealPlan(
        part="torch",
        engine_args=["--backend", "torch", "--dtype", "float32"],
        engines=TORCH_ENGINES,
        scenarios=(LONG_PROMPT,),
        contenders=(CONTENDERS[0], CONTENDERS[1], CONTENDERS[3]),
        rates={LONG_PROMPT.name: (rate,)},
        requests={LONG_PROMPT.name: (requests,)},
        prefill={LONG_PROMPT.name: 1},
        twin_cost=None,
    )


# -- report ---------------------------------------------------------------------------------------------


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def brief(p: Point) -> str:
    return (
        f"{p.part} {p.scenario} {p.contender} {split_label(p.prefill, p.replicas)} rate {p.rate:g}: "
        f"TTFT {p.metric('ttft', 'mean'):.0f}/{p.metric('ttft', 'p99'):.0f} ms, "
        f"TPOT {p.metric('tpot', 'mean'):.0f}/{p.metric('tpot', 'p99'):.0f} ms, "
        f"JCT {p.metric('e2el', 'mean'):.0f}/{p.metric('e2el', 'p99'):.0f} ms (mean/p99), "
        f"{p.summary.completed} done, {p.summary.failed} failed"
    )


def busy(row: dict[str, Any]) -> str:
    if "busy_both" in row:
        return f"{row['busy_both']:.0%} (both)"
    if "busy_prefill" in row:
        return f"{row['busy_prefill']:.0%} / {row['busy_decode']:.0%}"
    return "-"


# (header, key, scale): seconds for TTFT and JCT, milliseconds for TPOT
METRICS = (
    ("TTFT mean", "mean_ttft_ms", 1000),
    ("TTFT p99", "p99_ttft_ms", 1000),
    ("TPOT mean (ms)", "mean_tpot_ms", 1),
    ("TPOT p99 (ms)", "p99_tpot_ms", 1),
    ("JCT mean", "mean_e2el_ms", 1000),
    ("JCT p99", "p99_e2el_ms", 1000),
)


def rounded(value: float | None, scale: int) -> float:
    """The figure as the table shows it (seconds to 2 places, milliseconds whole); NaN when missing."""
    if value is None or math.isnan(value):
        return math.nan
    return round(value / scale, 2) if scale > 1 else float(round(value))


def cell(value: float | None, scale: int) -> str:
    x = rounded(value, scale)
    return "-" if math.isnan(x) else f"{x:.2f}" if scale > 1 else f"{x:.0f}"


def table(rows: Sequence[dict[str, Any]], bold: bool = True) -> str:
    """A markdown table grouped by rate, with the best figure of each group in bold; times in seconds."""
    twin = any("sim" in r for r in rows)
    head = ["rate", "strategy", "prefill:decode", "req/s done", *(m[0] for m in METRICS), "failed"]
    head += ["sim TTFT mean", "sim JCT mean"] if twin else ["busy P / D"]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|---|" + "---:|" * (len(head) - 3)]
    order = {c.label: i for i, c in enumerate(CONTENDERS)}
    for rate in sorted({r["rate"] for r in rows}):
        group = sorted((r for r in rows if r["rate"] == rate), key=lambda r: order[r["contender"]])
        best = {key: min(rounded(r[key], scale) for r in group) for _, key, scale in METRICS}
        for r in group:
            figures = []
            for _, key, scale in METRICS:
                text = cell(r[key], scale)
                mark = bold and len(group) > 1 and rounded(r[key], scale) == best[key]
                figures.append(f"**{text}**" if mark else text)
            cells = [
                f"{rate:g}",
                r["contender"],
                split_label(r["prefill"], r["replicas"]),
                f"{r['request_throughput']:.2f}",
                *figures,
            ]
            cells.append(str(r["failed"]))
            if twin:
                cells += [cell(r.get("sim", {}).get(k), 1000) for k in ("mean_ttft_ms", "mean_e2el_ms")]
            else:
                cells.append(busy(r))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def turn_table(rows: Sequence[dict[str, Any]]) -> str:
    """Mean TTFT (s) by conversation turn, one row per strategy and rate."""
    turns = max(len(r["mean_ttft_ms_by_turn"]) for r in rows)
    head = ["rate", "strategy", *(f"turn {t + 1}" for t in range(turns))]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * turns]
    order = {c.label: i for i, c in enumerate(CONTENDERS)}
    for r in sorted(rows, key=lambda r: (r["rate"], order[r["contender"]])):
        cells = [f"{r['rate']:g}", r["contender"], *(cell(t, 1000) for t in r["mean_ttft_ms_by_turn"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_tables(rows: Sequence[dict[str, Any]]) -> None:
    for sc in SCENARIOS:
        for part in ("sim", "sim-split", "sim-loopback", "real", "torch"):
            mine = [r for r in rows if r["part"] == part and r["scenario"] == sc.name]
            if mine:
                print(f"\n### {part}: {sc.name}\n\n{table(mine, bold=part != 'sim-split')}")
            if part == "sim" and mine and all("mean_ttft_ms_by_turn" in r for r in mine):
                print(f"\n### sim: {sc.name}, mean TTFT by turn\n\n{turn_table(mine)}")


STYLES = ("o-", "s--", "^-", "v-", "x:")  # pd_cache_aware dotted: on random prompts it is pd exactly


def plot(rows: Sequence[dict[str, Any]], scenario: str, path: Path) -> Path:
    """Mean and p99 TTFT, TPOT and JCT against the request rate, one line per strategy (JSON rows)."""
    fig = Figure(figsize=(14, 7), layout="constrained")
    axes = fig.subplots(2, 3)
    for col, (key, name) in enumerate((("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "JCT (E2E)"))):
        for row, stat in enumerate(("mean", "p99")):
            ax = axes[row][col]
            for c, style in zip(CONTENDERS, STYLES, strict=True):
                mine = sorted((r for r in rows if r["contender"] == c.label), key=lambda r: r["rate"])
                if mine:
                    split = split_label(mine[0]["prefill"], mine[0]["replicas"])
                    ys = [(r[f"{stat}_{key}_ms"] or math.nan) / 1000 for r in mine]
                    ax.plot([r["rate"] for r in mine], ys, style, label=f"{c.label} ({split})")
            ax.set_title(f"{stat} {name}")
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel("seconds")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{scenario}: {SIM_REPLICAS} simulated replicas")
    fig.savefig(path, dpi=90)
    return path


def plot_all(rows: Sequence[dict[str, Any]], out: Path) -> None:
    for sc in SCENARIOS:
        mine = [r for r in rows if r["part"] == "sim" and r["scenario"] == sc.name]
        if mine:
            print(f"plot: {plot(mine, sc.name, out / f'strategies-{sc.name}.png')}")


def report(points: list[Point], args: argparse.Namespace, wall_s: float) -> None:
    out = Path(args.out_dir)
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "profile": str(PROFILE.relative_to(ROOT)),
        "link_bytes_per_s": LINK_BYTES_PER_S,
        "loopback_bytes_per_s": LOOPBACK_BYTES_PER_S,
        "kv_blocks": KV_BLOCKS,
        "scenarios": {sc.name: {"workload": sc.workload.describe(), "policy": sc.policy} for sc in SCENARIOS},
        "wall_s": wall_s,
    }
    for part_set, name in ((("sim", "sim-split", "sim-loopback"), "sim"), (("real", "torch"), "real")):
        mine = [p.to_dict() for p in points if p.part in part_set]
        if mine:
            write_json(out / "results" / f"strategies-{name}.json", {**meta, "points": mine})
    print(f"\nmachine: {meta['machine']}; {meta['date']}; {wall_s:.0f} s in all")
    rows = [p.to_dict() for p in points]
    print_tables(rows)
    plot_all(rows, out)


def from_json(out: Path) -> None:
    rows: list[dict[str, Any]] = []
    for name in ("sim", "real"):
        path = out / "results" / f"strategies-{name}.json"
        if path.exists():
            data = orjson.loads(path.read_bytes())
            print(f"{path}: {data['date']}, {data['command']}, {data['wall_s']:.0f} s")
            rows += data["points"]
    print_tables(rows)
    plot_all(rows, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    only = p.add_mutually_exclusive_group()
    only.add_argument("--sim-only", action="store_true", help="the simulation at scale only")
    only.add_argument("--real-only", action="store_true", help="the real engine processes only")
    p.add_argument("--no-torch", action="store_true", help="no torch engines (sim-backend processes only)")
    p.add_argument("--torch-requests", type=int, default=4)
    p.add_argument("--torch-rate", type=float, default=0.05)
    p.add_argument("--quick", action="store_true", help="a few requests per point: checks the script runs")
    p.add_argument("--out-dir", default=None, help="default docs/ (a temporary folder with --quick)")
    p.add_argument("--from-json", action="store_true", help="only the tables and plots of the saved results")
    args = p.parse_args()
    if args.out_dir is None:
        args.out_dir = tempfile.mkdtemp(prefix="strategies-") if args.quick else str(ROOT / "docs")
    if args.from_json:
        from_json(Path(args.out_dir))
        return
    scenarios = SCENARIOS
    if args.quick:
        scenarios = tuple(dataclasses.replace(sc, requests=60, real_requests=(5, 5)) for sc in SCENARIOS)

    started = time.perf_counter()
    tokenizer = Tokenizer.load(resolve_model(MODEL))
    points: list[Point] = []
    if not args.real_only:
        points += run_sim(scenarios, tokenizer)
    if not args.sim_only:
        log(f"load average before the real runs: {os.getloadavg()}")
        with tempfile.TemporaryDirectory() as tmp:
            profile = Path(tmp) / "profile.json"
            cost_model(LINK_BYTES_PER_S).to_json(profile)  # the sim engines model the same link
            points += run_real(real_plan(scenarios, profile), tokenizer)
        if not args.no_torch:
            points += run_real(torch_plan(args.torch_requests, args.torch_rate), tokenizer)
    report(points, args, time.perf_counter() - started)


if __name__ == "__main__":
    main()
