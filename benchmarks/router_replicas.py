"""Router replicas: the multi-turn shared-prefix workload of docs/routing-quality.md over the same sim
engines, each request sent to a router drawn at random among 1 router, 4 routers sharing state through
Redis (`--shared-state`), and 4 routers alone; prefix_aware everywhere. Reports the engines' prefix-cache
hit rate, TTFT p50/p99 and throughput, the ratios to the single router (the goal: 4 sharing keep >= 0.95
of its hit rate and a TTFT p99 within 10 %), and what sharing costs a request.

Usage: python benchmarks/router_replicas.py [--rate 5] [--num-requests 200] [--docs docs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routing_quality import (
    MODEL,
    RouterTarget,
    engine_metrics,
    flush,
    result_row,
    setup_line,
    sim_fleet,
    wait_for_workers,
    wait_idle,
    workload,
)

from microserve.bench.metrics import summarize
from microserve.bench.report import write_json
from microserve.bench.runner import RunConfig, run_benchmark
from microserve.bench.sender import Target
from microserve.machine import describe_machine
from microserve.processes import ManagedProcess, free_port
from microserve.router.policies import PrefixAware

BEGIN, END = "<!-- router_replicas.py: begin -->", "<!-- router_replicas.py: end -->"
POLICY = RouterTarget("microserve", "prefix_aware")


@dataclass(frozen=True, slots=True)
class SpreadTarget(Target):
    """Each request to one of `base_urls`, drawn at random (seeded): clients behind a load balancer."""

    base_urls: tuple[str, ...] = ()
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    @property
    def url(self) -> str:
        return self.rng.choice(self.base_urls).rstrip("/") + self.endpoint.path


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing: scripts/setup.sh --test installs it")
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def shared_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
        return dict(json.loads(r.read()).get("shared_state") or {})


def measure(
    name: str, routers: int, redis: str | None, engines: list[str], args: argparse.Namespace, salt: int
) -> dict[str, Any]:
    procs = []
    for _ in range(routers):
        port = free_port()
        cmd = POLICY.command(port, engines)
        if redis:
            cmd += ["--shared-state", redis]
        procs.append(ManagedProcess(cmd, f"http://127.0.0.1:{port}"))
    urls = tuple(p.url for p in procs)
    client = SpreadTarget(urls[0], MODEL, request_timeout_s=args.request_timeout, base_urls=urls)
    config = RunConfig(request_rate=args.rate, num_requests=args.num_requests, seed=0)
    try:
        for proc in procs:
            wait_for_workers(POLICY, proc, len(engines))
        wait_idle(engines)
        asyncio.run(flush(engines, args, salt))
        before = [engine_metrics(url) for url in engines]
        result = asyncio.run(run_benchmark(client, workload(args), config))
        after = [engine_metrics(url) for url in engines]
        states = [shared_state(url) for url in urls]
    finally:
        for proc in procs:
            proc.stop(timeout=10)
    summary = summarize(result.records, result.duration_s, (50.0, 99.0), skipped=result.skipped)
    row = result_row(POLICY, summary, before, after)
    trips = [s["sync_round_trip_p50_ms"] for s in states if s.get("sync_round_trip_p50_ms") is not None]
    row.update(
        target=name,
        routers=routers,
        shared=redis is not None,
        modes=[s.get("mode") for s in states],
        sync_round_trip_p50_ms=statistics.median(trips) if trips else None,
    )
    return row


def hot_path_cost_us(args: argparse.Namespace, repeat: int = 2000) -> dict[str, float]:
    """What sharing adds to a pick, in-process: prefix_aware's select with the replica's insert listener
    (it queues the hashes for the next tick) against without; p50 microseconds over the workload's
    first prompts. No Redis round trip is on a request's way."""
    from microserve.router.redis_state import RedisState
    from microserve.router.request import Route, RoutedRequest
    from microserve.router.workers import WorkerPool, WorkerSpec

    w = workload(args)
    prompts = [w.system_prompt(i) + " " + w.user_message(i, 0) for i in range(64)]
    bodies = [json.dumps({"model": MODEL, "prompt": p}).encode() for p in prompts]

    def timings(listen: bool) -> list[float]:
        pool = WorkerPool()
        for i in range(args.engines):
            pool.add(WorkerSpec(f"http://127.0.0.1:{9000 + i}", models=(MODEL,)))
        policy = PrefixAware()
        if listen:
            state = RedisState("redis://127.0.0.1:1/0")  # never started: only its listener runs
            state.bind(lambda: pool, lambda: policy)
            state._watch_index()
        out = []
        for k in range(repeat):
            req = RoutedRequest.parse(Route.COMPLETIONS, bodies[k % len(bodies)])
            started = time.perf_counter()
            policy.select(pool.candidates(MODEL), req)
            out.append(time.perf_counter() - started)
        return out

    alone, shared = statistics.median(timings(False)), statistics.median(timings(True))
    return {"select_us": alone * 1e6, "select_shared_us": shared * 1e6, "added_us": (shared - alone) * 1e6}


def table(rows: list[dict[str, Any]]) -> list[str]:
    base = rows[0]
    out = [
        "| routers | req/s | TTFT p50 ms | TTFT p99 ms | hit rate | hit rate / 1 router "
        "| TTFT p99 / 1 router | requests per engine | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        cells = [
            r["target"],
            f"{r['request_throughput']:.2f}",
            f"{r['ttft_p50_ms']:.0f}",
            f"{r['ttft_p99_ms']:.0f}",
            f"{r['prefix_hit_rate']:.1%}",
            f"{r['prefix_hit_rate'] / base['prefix_hit_rate']:.2f}",
            f"{r['ttft_p99_ms'] / base['ttft_p99_ms']:.2f}",
            " ".join(map(str, r["requests_per_engine"])),
            str(r["failed"]),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def verdict(rows: list[dict[str, Any]], cost: dict[str, float]) -> list[str]:
    base, shared = rows[0], next(r for r in rows if r["shared"])
    hit = shared["prefix_hit_rate"] / base["prefix_hit_rate"]
    p99 = shared["ttft_p99_ms"] / base["ttft_p99_ms"]
    trip = shared["sync_round_trip_p50_ms"]
    return [
        f"- Goal: {shared['routers']} sharing routers keep >= 0.95 of one router's hit rate: **{hit:.2f}** "
        f"({'met' if hit >= 0.95 else 'not met'}).",
        f"- Goal: their TTFT p99 within 10 % of one router's: **{p99:.2f}x** "
        f"({'met' if p99 <= 1.10 else 'not met'}).",
        f"- On a request's way: no Redis round trip; the pick with the replica's listener takes "
        f"{cost['select_shared_us']:.1f} µs p50 against {cost['select_us']:.1f} µs without "
        f"(+{cost['added_us']:.1f} µs). Off it, each replica's sync tick (one pipelined round trip every "
        f"20 ms) took {trip:.2f} ms p50.",
    ]


def write_markdown(path: Path, section: list[str]) -> None:
    text = path.read_text() if path.exists() else f"# Router replicas\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(head + BEGIN + "\n" + "\n".join(section) + "\n" + END + tail)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, default=8)
    p.add_argument("--routers", type=int, default=4)
    p.add_argument("--num-kv-blocks", type=int, default=192, help="per engine, of 16 tokens")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--profile", default=None, help="the engines' cost model JSON (default: built-in)")
    p.add_argument("--rate", type=float, default=5.0, help="Poisson arrivals, requests/s")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument("--system-prompts", type=int, default=4)
    p.add_argument("--system-prompt-len", type=int, default=256)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--turn-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--docs", default=None, help="write results/router-replicas.json and router-replicas.md")
    args = p.parse_args()

    started = time.perf_counter()
    n = args.routers
    rows = []
    with sim_fleet(args) as engines, redis_server() as redis:
        plans = [("1 router", 1, None), (f"{n} sharing Redis", n, redis), (f"{n} alone", n, None)]
        for salt, (name, routers, state) in enumerate(plans):
            rows.append(measure(name, routers, state, engines, args, salt))
            print(f"{name}: done", file=sys.stderr, flush=True)
    cost = hot_path_cost_us(args)
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": describe_machine(),
        "command": " ".join(["python", *sys.argv]),
        "setup": setup_line(args),
        "wall_s": time.perf_counter() - started,
        "hot_path": cost,
    }
    lines = [
        f"`{meta['command']}`, {meta['date']}, {meta['machine']}; {meta['wall_s'] / 60:.0f} minutes.",
        "",
        meta["setup"] + "; prefix_aware on every router; each request to a router drawn at random.",
        "",
        *table(rows),
        "",
        *verdict(rows, cost),
    ]
    print("\n".join(lines))
    if args.docs:
        docs = Path(args.docs)
        write_json(docs / "results" / "router-replicas.json", {**meta, "results": rows})
        write_markdown(docs / "router-replicas.md", lines)


if __name__ == "__main__":
    main()
