"""Simulated against measured: the same fleet and workload through `microserve simulate` and for real.

Real: N sim-backend engine processes behind an in-process router, loaded by `microserve bench`'s runner.
Simulated: the same engines' scheduler, KV cache, cost model, policy and strategy on the virtual clock.
Both use the same cost model (the sim backend's built-in one, or --profile), so what differs is what
the simulator leaves out: HTTP, SSE, the router's proxying and the engines' own Python time.

Usage: python benchmarks/sim_validation.py [--engines 4] [--roles both] [--strategy data_parallel]
       [--policy round_robin] [--rate 2] [--num-requests 60] [--input-len 256] [--output-len 32] [--out F]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from typing import Any

from microserve.bench.metrics import Summary, summarize
from microserve.bench.runner import RunConfig, run_benchmark
from microserve.bench.sender import Target
from microserve.bench.workloads import Endpoint, RandomWorkload
from microserve.machine import describe_machine
from microserve.model.loader import resolve_model
from microserve.model.tokenizer import Tokenizer
from microserve.processes import ManagedProcess, free_port
from microserve.router.app import RouterServer
from microserve.router.config import RouterConfig
from microserve.router.router import Router
from microserve.router.workers import WorkerSpec
from microserve.runner.cost_model import CostModel
from microserve.simulator.host import FleetConfig, parse_roles
from microserve.simulator.replica import ReplicaConfig
from microserve.simulator.run import Simulator
from microserve.tokens import INTERNAL_TOKEN_ENV, generate_token

TOKEN = generate_token()  # the engines' internal token: KV moves only between engines that share it

MODEL = "smollm2-135m"


async def measure(
    engines: list[ManagedProcess], roles: list[str], args: argparse.Namespace, config: RunConfig
) -> Summary:
    workers = [WorkerSpec(e.url, role=role) for e, role in zip(engines, roles, strict=True)]
    router = Router(
        RouterConfig(
            workers=workers,
            strategy=args.strategy,
            strategy_options=json.loads(args.strategy_options),
            policy=args.policy,
            policy_options=json.loads(args.policy_options),
            internal_token=TOKEN,
        )
    )
    server = RouterServer(router)
    await server.start()
    try:
        target = Target(server.url, MODEL, endpoint=Endpoint.COMPLETIONS)
        result = await run_benchmark(target, workload(args), config)
    finally:
        await server.stop()
    return summarize(result.records, result.duration_s)


def workload(args: argparse.Namespace) -> RandomWorkload:
    return RandomWorkload(
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        token_ids=True,
        seed=0,
    )


def simulate(roles: list[str], args: argparse.Namespace, config: RunConfig) -> tuple[Summary, float]:
    cost = CostModel.from_json(args.profile) if args.profile else CostModel.default()
    fleet = FleetConfig(
        roles=parse_roles(",".join(f"{r}:1" for r in roles), None),
        replica=ReplicaConfig(cost, num_blocks=args.num_kv_blocks),
        strategy=args.strategy,
        strategy_options=json.loads(args.strategy_options),
        policy=args.policy,
        policy_options=json.loads(args.policy_options),
    )
    sim = Simulator(fleet, Tokenizer.load(resolve_model(MODEL)), Endpoint.COMPLETIONS)
    run = sim.run(workload(args), config)
    return run.summary, run.wall_s


def rows(real: Summary, sim: Summary) -> list[tuple[str, float, float, float]]:
    out = []
    for key, name in (("ttft", "TTFT"), ("e2el", "JCT (E2E)"), ("tpot", "TPOT")):
        r, s = getattr(real, key), getattr(sim, key)
        pairs = (("mean", r.mean, s.mean), ("p50", r.median, s.median))
        for stat, a, b in (*pairs, ("p90", r.percentiles[90.0], s.percentiles[90.0])):
            out.append((f"{name} {stat}", a, b, (b - a) / a))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--roles", default="both", help="'both' or e.g. prefill:1,decode:3")
    p.add_argument("--strategy", default="data_parallel")
    p.add_argument("--strategy-options", default="{}")
    p.add_argument("--policy", default="round_robin")
    p.add_argument("--policy-options", default="{}")
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--num-requests", type=int, default=60)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--range-ratio", type=float, default=0.25, help="lengths uniform in len*(1±r)")
    p.add_argument("--num-kv-blocks", type=int, default=1024)
    p.add_argument("--profile", default=None, help="cost model JSON for both sides (default: built-in)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    roles = [str(r) for r in parse_roles(args.roles, args.engines if ":" not in args.roles else None)]
    config = RunConfig(request_rate=args.rate, num_requests=args.num_requests, seed=0)
    engine_args = ["--backend", "sim", "--num-kv-blocks", str(args.num_kv_blocks)]
    if args.profile:
        engine_args += ["--sim-profile", args.profile]

    started = time.perf_counter()
    engines: list[ManagedProcess] = []
    try:
        for _ in roles:  # started side by side: one at a time would take N times as long
            port = free_port()
            cmd = [sys.executable, "-m", "microserve", "engine", "--port", str(port), "--threads", "1"]
            url = f"http://127.0.0.1:{port}"
            engines.append(ManagedProcess([*cmd, *engine_args], url, {INTERNAL_TOKEN_ENV: TOKEN}))
        for engine in engines:
            engine.wait_ready(timeout=300)
        real = asyncio.run(measure(engines, roles, args, config))
    finally:
        for engine in engines:
            engine.stop()
    real_s = time.perf_counter() - started
    sim, sim_wall = simulate(roles, args, config)

    print(f"machine: {describe_machine()}; {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"fleet: {len(roles)} engines ({args.roles}), {args.strategy}/{args.policy}, {args.num_kv_blocks} KV "
        f"blocks each; workload: random token ids, input {args.input_len}, output {args.output_len} "
        f"(±{args.range_ratio:.0%}), "
        f"Poisson {args.rate:g} req/s, {args.num_requests} requests, seed 0"
    )
    print(
        f"measured: {real.completed} done, {real.failed} failed, {real.total_input_tokens} tokens in, "
        f"{real.total_output_tokens} out, {real.duration_s:.1f} s "
        f"({real_s:.0f} s with start-up)"
    )
    print(
        f"simulated: {sim.completed} done, {sim.failed} failed, {sim.total_input_tokens} tokens in, "
        f"{sim.total_output_tokens} out, {sim.duration_s:.1f} s virtual "
        f"in {sim_wall:.2f} s"
    )
    print()
    print("| metric | measured (ms) | simulated (ms) | sim / measured - 1 |")
    print("|---|---:|---:|---:|")
    table = rows(real, sim)
    for name, a, b, err in table:
        print(f"| {name} | {a:.1f} | {b:.1f} | {err:+.1%} |")
    if args.out:
        data: dict[str, Any] = {
            "args": vars(args),
            "machine": describe_machine(),
            "rows": [
                {"metric": n, "measured_ms": a, "simulated_ms": b, "rel_error": e} for n, a, b, e in table
            ],
        }
        with open(args.out, "w") as f:
            json.dump(data, f, indent=2)


if __name__ == "__main__":
    main()
