"""The `microserve simulate` command: a fleet and a bench workload in, bench's table, JSON and plots out.

Thin on purpose: the fleet lives in `host.py`, the run in `run.py`; the workload flags are bench's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

import orjson
from rich.console import Console

from microserve.bench.arrivals import ArrivalKind
from microserve.bench.cli import DEFAULT_NUM_REQUESTS, run_configs, workload_from_args
from microserve.bench.metrics import DEFAULT_PERCENTILES, parse_goodput, parse_percentiles
from microserve.bench.workloads import Endpoint
from microserve.machine import describe_machine
from microserve.router.strategies import STRATEGIES


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    def error(message: str) -> NoReturn:
        parser.exit(2, f"microserve simulate: error: {message}\n")

    parser.error = error  # type: ignore[method-assign]


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    from microserve.args import parse_size

    _one_line_errors(p)
    fleet = p.add_argument_group("fleet")
    fleet.add_argument(
        "--replicas", type=int, default=None, help="replicas (default 4, or what --roles names)"
    )
    fleet.add_argument("--roles", default="both", help="'both', 'decode'…, or counts like prefill:2,decode:6")
    fleet.add_argument(
        "--strategy", default="data_parallel", help=f"{', '.join(STRATEGIES)} or file.py:Class"
    )
    fleet.add_argument("--strategy-options", type=_json_object, default={}, help='JSON, e.g. {"ratio": 0.2}')
    fleet.add_argument("--policy", default="round_robin")
    fleet.add_argument("--policy-options", type=_json_object, default={}, help='JSON, e.g. {"min_match": 64}')
    fleet.add_argument("--profile", default=None, help="cost model JSON (microserve engine profile)")
    fleet.add_argument("--kv-cache-memory", type=parse_size, default=parse_size("1GiB"), help="per replica")
    fleet.add_argument("--num-kv-blocks", type=int, default=None, help="per replica; wins over memory")
    fleet.add_argument("--block-size", type=int, default=16)
    fleet.add_argument("--max-model-len", type=int, default=8192)
    fleet.add_argument("--max-num-seqs", type=int, default=64)
    fleet.add_argument("--max-num-batched-tokens", type=int, default=512)
    fleet.add_argument(
        "--transfer-bandwidth", type=parse_size, default=None, help="KV bytes/s between replicas, e.g. 25GiB"
    )
    fleet.add_argument("--load-interval", type=float, default=0.5, help="seconds between load polls")
    fleet.add_argument(
        "--admission",
        action="store_true",
        help="run the router's admission queue (sized by the replicas, --max-queue-wait budget)",
    )
    fleet.add_argument("--max-queue-wait", type=float, default=2.0, help="with --admission: seconds (2)")
    fleet.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="with --admission: requests running at once (default: the replicas' batch sizes)",
    )
    fleet.add_argument(
        "--no-fair-share",
        action="store_true",
        help="admit waiting requests in arrival order within a priority class, whatever their tenant",
    )
    fleet.add_argument(
        "--deadlines",
        action="store_true",
        help="run the router's first-byte and stall deadlines per attempt (default floors 5 s and 2 s)",
    )
    fleet.add_argument("--model", default="smollm2-135m", help="whose tokenizer makes the prompt ids")

    scale = p.add_argument_group("autoscaling (the router's autoscaler on the virtual clock)")
    scale.add_argument(
        "--autoscale", default=None, metavar="MIN:MAX", help="replicas per role; turns --admission on"
    )
    scale.add_argument("--scale-target", type=float, default=8.0, help="requests per replica to aim at (8)")
    scale.add_argument(
        "--scale-down-after", type=float, default=30.0, help="seconds of low load per step down"
    )
    scale.add_argument("--scale-up-cooldown", type=float, default=5.0, help="seconds between steps up (5)")
    scale.add_argument(
        "--scale-down-step",
        type=int,
        default=0,
        help="replicas a step down may remove (0: to what the load needs)",
    )
    scale.add_argument("--engine-startup", type=float, default=20.0, help="seconds a new replica takes (20)")
    scale.add_argument(
        "--scale-down-ratio",
        type=float,
        default=0.5,
        help="share of the target the load must fall to before a replica goes (0.5)",
    )
    scale.add_argument(
        "--scale-lookahead",
        type=float,
        default=0.0,
        help="seconds: scale up for the load expected this far ahead at its growth rate (0: the load now)",
    )
    scale.add_argument(
        "--scale-ttft-slo",
        type=float,
        default=None,
        help="seconds: a recent TTFT p99 above it adds a replica and holds scale-down (off)",
    )
    scale.add_argument(
        "--handoff-tokens",
        type=int,
        default=0,
        help="KV tokens of its hottest prefixes a leaving replica hands to a survivor (0: off)",
    )
    scale.add_argument(
        "--load-shape",
        choices=["diurnal", "bursty"],
        default=None,
        help="--request-rate is then the base rate",
    )
    scale.add_argument(
        "--peak-rate", type=float, default=None, help="with --load-shape: requests/s at the peak"
    )
    scale.add_argument("--period", type=float, default=600.0, help="with --load-shape: seconds (600)")
    scale.add_argument("--burst-len", type=float, default=60.0, help="with --load-shape bursty: seconds (60)")

    load = p.add_argument_group("load (as microserve bench)")
    load.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="NAME:RATE[:PRIORITY]",
        help="a tenant sending the workload at RATE requests/s in a priority class (high, normal, low); "
        "repeat for several (turns --admission on; --request-rate is then unused)",
    )
    load.add_argument("--request-rate", default="inf", help="requests/s, inf, or a comma list to sweep")
    load.add_argument("--arrival", choices=[k.value for k in ArrivalKind], default=None)
    load.add_argument("--burstiness", type=float, default=1.0)
    load.add_argument("--max-concurrency", type=int, default=None)
    end = load.add_mutually_exclusive_group()
    end.add_argument("--num-requests", type=int, default=None, help=f"default {DEFAULT_NUM_REQUESTS}")
    end.add_argument("--duration", type=float, default=None, help="virtual seconds to keep issuing")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--request-timeout", type=float, default=600.0, help="virtual seconds per request")
    load.add_argument("--endpoint", choices=[e.value for e in Endpoint], default=Endpoint.CHAT.value)

    work = p.add_argument_group("workload (as microserve bench)")
    work.add_argument("--workload", choices=["random", "multi-turn", "shared-doc", "trace"], default="random")
    work.add_argument("--output-len", type=int)
    for flag in ("input-len", "turns", "system-prompts", "system-prompt-len", "turn-len"):
        work.add_argument(f"--{flag}", type=int)
    for flag in ("documents", "document-len", "questions", "question-len"):
        work.add_argument(f"--{flag}", type=int)
    work.add_argument("--range-ratio", type=float)
    work.add_argument("--prompt-format", choices=["text", "token-ids"])
    work.add_argument("--trace")

    out = p.add_argument_group("report")
    out.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS")
    out.add_argument("--percentiles", default=",".join(f"{q:g}" for q in DEFAULT_PERCENTILES))
    out.add_argument("--out", default=None, help="results JSON path (bench's shape, plus the fleet)")
    out.add_argument("--plots", default=None, help="directory for PNG plots")


def scaling_from_args(args: argparse.Namespace) -> Any:
    """`--autoscale MIN:MAX` and its knobs as a SimScaling, or None; ValueError with a one-line message."""
    from microserve.router.autoscaler import AutoscalerConfig
    from microserve.router.handoff import HandoffConfig
    from microserve.simulator.scaling import SimScaling

    if args.autoscale is None:
        return None
    low, sep, high = args.autoscale.partition(":")
    try:
        bounds = int(low), int(high)
    except ValueError:
        raise ValueError(f"--autoscale takes MIN:MAX replicas, like 1:8, got {args.autoscale!r}") from None
    if not sep:
        raise ValueError(f"--autoscale takes MIN:MAX replicas, like 1:8, got {args.autoscale!r}")
    config = AutoscalerConfig(
        min_replicas=bounds[0],
        max_replicas=bounds[1],
        target_load=args.scale_target,
        scale_down_after_s=args.scale_down_after,
        scale_up_cooldown_s=args.scale_up_cooldown,
        down_step=args.scale_down_step or None,
        down_ratio=args.scale_down_ratio,
        ttft_slo_s=args.scale_ttft_slo,
        growth_lookahead_s=args.scale_lookahead,
    )
    if args.handoff_tokens < 0:
        raise ValueError(f"--handoff-tokens must be >= 0, got {args.handoff_tokens}")
    handoff = HandoffConfig(max_tokens=args.handoff_tokens) if args.handoff_tokens else None
    return SimScaling(config, startup_s=args.engine_startup, handoff=handoff)


def tenants_from_args(args: argparse.Namespace) -> list[Any]:
    """`--tenant NAME:RATE[:PRIORITY]`s as TenantLoads; ValueError with a one-line message."""
    from microserve.simulator.tenants import TenantLoad, check_tenants

    tenants = [TenantLoad.parse(text) for text in args.tenant]
    check_tenants(tenants)
    if tenants and args.load_shape is not None:
        raise ValueError("--tenant sends at each tenant's rate: it does not combine with --load-shape")
    return tenants


def tenant_table(rows: list[dict[str, Any]], percentiles: tuple[float, ...]) -> Any:
    from rich.table import Table

    table = Table(title="per tenant")
    for column in ("tenant", "class", "req/s", "sent", "answered", "refused", "failed", "TTFT p50 ms"):
        table.add_column(column, justify="left" if column in ("tenant", "class") else "right")
    for p in percentiles:
        table.add_column(f"TTFT p{p:g} ms", justify="right")
    for row in rows:
        ttft = row["ttft_ms"] or {}
        keys = ("median", *(f"p{p:g}" for p in percentiles))
        cells = [f"{ttft[k]:.1f}" if k in ttft else "-" for k in keys]
        table.add_row(
            row["tenant"],
            row["priority"],
            f"{row['rate']:g}",
            str(row["sent"]),
            str(row["completed"]),
            str(row["refused"]),
            str(row["failed"]),
            *cells,
        )
    return table


def shaped_from_args(args: argparse.Namespace, base: float, seed: int) -> Any:
    """The arrival gaps of `--load-shape` (base rate --request-rate, --peak-rate), or None."""
    from microserve.simulator.traces import LoadShape, rate_function, shaped_gaps

    if args.load_shape is None:
        return None
    peak = args.peak_rate if args.peak_rate is not None else base
    rate = rate_function(LoadShape(args.load_shape), base, peak, args.period, args.burst_len)
    return shaped_gaps(rate, peak, seed)


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    """`microserve simulate`: 0 when every run completed a request, 1 otherwise, 2 for a bad flag."""
    import time

    from microserve.bench.report import RunReport, results_dict, summary_table, write_json, write_plots
    from microserve.model.loader import resolve_model
    from microserve.model.tokenizer import Tokenizer
    from microserve.router.admission import AdmissionConfig
    from microserve.router.deadlines import DeadlineConfig
    from microserve.runner.cost_model import CostModel
    from microserve.simulator.host import FleetConfig, parse_roles
    from microserve.simulator.replica import ReplicaConfig
    from microserve.simulator.run import Simulator

    console = console or Console()
    endpoint = Endpoint(args.endpoint)
    workload = workload_from_args(args)
    workload.check_endpoint(endpoint)
    tenants = tenants_from_args(args)
    cost = CostModel.from_json(args.profile) if args.profile else CostModel.default()
    if args.transfer_bandwidth is not None:
        cost = dataclasses.replace(cost, transfer_bandwidth_bytes_per_s=float(args.transfer_bandwidth))
    blocks = args.num_kv_blocks or ReplicaConfig.blocks_for_memory(
        cost, args.kv_cache_memory, args.block_size
    )
    replicas = args.replicas if args.replicas is not None or ":" in args.roles else 4
    scaling = scaling_from_args(args)
    if scaling is not None and args.replicas is None and ":" not in args.roles:
        replicas = max(1, scaling.config.min_replicas)
    fleet = FleetConfig(
        roles=parse_roles(args.roles, replicas),
        replica=ReplicaConfig(
            cost=cost,
            num_blocks=blocks,
            block_size=args.block_size,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
        ),
        strategy=args.strategy,
        strategy_options=args.strategy_options,
        policy=args.policy,
        policy_options=args.policy_options,
        load_interval_s=args.load_interval,
        request_timeout_s=args.request_timeout,
        admission=AdmissionConfig(
            max_concurrent=args.max_concurrent,
            max_queue_wait_s=args.max_queue_wait,
            queue_timeout_s=args.request_timeout,
        )
        if args.admission or scaling is not None or tenants
        else None,
        autoscale=scaling,
        fair_share=not args.no_fair_share,
        deadlines=DeadlineConfig() if args.deadlines else None,
    )
    if tenants:
        if args.request_rate != "inf":
            raise ValueError("--tenant sets each tenant's rate: it does not combine with --request-rate")
        args.request_rate = f"{sum(t.rate for t in tenants):g}"  # the run's whole rate, for the report
    configs = run_configs(args, workload)
    percentiles = parse_percentiles(args.percentiles)
    slos = parse_goodput(args.goodput)

    started = time.perf_counter()
    simulator = Simulator(fleet, Tokenizer.load(resolve_model(args.model)), endpoint)
    runs = []
    for i, config in enumerate(configs):
        gaps = shaped_from_args(args, config.request_rate, config.seed)
        runs.append(simulator.run(workload.for_run(i), config, percentiles, slos, gaps, tenants))
    reports = [RunReport(r.result, r.summary) for r in runs]
    console.print(summary_table(reports, title=f"microserve simulate: {workload.name}"))
    for r in runs:
        if "tenants" in r.extra:
            console.print(tenant_table(r.extra["tenants"], percentiles))
    roles = ", ".join(f"{n} {role}" for role, n in fleet.describe()["roles"].items())
    console.print(
        f"fleet: {roles}; {fleet.strategy}, {fleet.policy}; {blocks} KV blocks each", highlight=False
    )
    for r in runs:
        rate = r.result.config.request_rate
        console.print(
            f"rate {'inf' if math.isinf(rate) else f'{rate:g}'}: simulated {r.result.duration_s:.1f} s "
            f"in {r.wall_s:.2f} s of wall time; {r.extra['engine_seconds']:.0f} engine-seconds",
            highlight=False,
        )
    if args.out:
        meta = {
            "simulated": True,
            "fleet": fleet.describe(),
            "profile": args.profile or "built-in",
            "model": args.model,
            "endpoint": endpoint.value,
            "workload": workload.describe(),
            "percentiles": list(percentiles),
            "wall_s": time.perf_counter() - started,
            "machine_description": describe_machine(),
        }
        data = results_dict(reports, meta)
        for entry, r in zip(data["runs"], runs, strict=True):
            entry["wall_s"] = r.wall_s
            entry["retries"] = r.retries
            entry["replicas"] = r.replicas
            entry.update(r.extra)
        write_json(args.out, data)
        console.print(f"results: {args.out}", highlight=False)
    if args.plots:
        for path in write_plots(reports, Path(args.plots)):
            console.print(f"plot: {path}", highlight=False)
    if any(r.summary.completed == 0 for r in runs):
        print("microserve simulate: error: a run completed no request", file=sys.stderr)
        return 1
    return 0
