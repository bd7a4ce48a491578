"""Routing quality: one multi-turn shared-prefix workload over the same sim engines through microserve's
router (every policy), sglang-router (cache_aware) and vllm-router (every policy), one run: throughput,
TTFT and E2E p50/p99, and the prefix-cache hit rate from the engines' /metrics counters, summed.

Every target gets its own router process, the same prompts and the same arrivals (seed 0), and a cold
cache: before it runs, every engine reads prompts of random token ids that fill its KV cache, so LRU
eviction drops every block the previous target left (restarting the engines would cost ~40 s a target).

Setup: benchmarks/setup_peers.sh. Usage: python benchmarks/routing_quality.py [--rate 5] [--num-requests 200]
       [--targets microserve:prefix_aware,sglang-router:cache_aware:balance-abs-threshold=2] [--docs docs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from matplotlib.figure import Figure
from router_overhead import PEERS  # the sibling benchmark knows where setup_peers.sh puts the peers

from microserve.bench.metrics import Summary, summarize
from microserve.bench.report import write_json
from microserve.bench.runner import RunConfig, run_benchmark
from microserve.bench.sender import Target
from microserve.bench.workloads import MultiTurnWorkload
from microserve.machine import describe_machine
from microserve.processes import ManagedProcess, engine_fleet, free_port
from microserve.router.policies import POLICIES, PrefixAware

MODEL = "smollm2-135m"
BLOCK_SIZE = 16  # the engines' default KV block, in tokens
VLLM_POLICIES = ("round_robin", "random", "power_of_two", "consistent_hash", "sticky_least_loaded")
VLLM_POLICIES += ("cache_aware", "kv_aware")
HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"
DONE = "vllm:request_success_total"
RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
BEGIN, END = "<!-- routing_quality.py: begin -->", "<!-- routing_quality.py: end -->"


@dataclass(frozen=True, slots=True)
class RouterTarget:
    """One router under test: which one, its policy and options (microserve's --policy-opt, else flags)."""

    router: str  # microserve, sglang-router or vllm-router
    policy: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        opts = f" ({', '.join(f'{k}={v}' for k, v in self.options)})" if self.options else ""
        return f"{self.router} {self.policy}{opts}"

    @property
    def is_peer(self) -> bool:
        return self.router != "microserve"

    def command(self, port: int, engines: list[str]) -> list[str]:
        if not self.is_peer:
            cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "router"]
            cmd += ["--port", str(port), "--policy", self.policy]
            cmd += [arg for k, v in self.options for arg in ("--policy-opt", f"{k}={v}")]
            return cmd + [arg for url in engines for arg in ("--worker", f"{url},model={MODEL}")]
        launchers = {
            "sglang-router": ([str(PEERS / "python"), "-m", "sglang_router.launch_router"], "warn"),
            "vllm-router": ([str(PEERS / "vllm-router")], "warning"),
        }
        launcher, quiet = launchers[self.router]
        cmd = [*launcher, "--host", "127.0.0.1", "--port", str(port), "--policy", self.policy]
        # Both default their metrics port to 29000: a free one, so that nothing else running collides.
        cmd += ["--log-level", quiet, "--prometheus-port", str(free_port())]
        cmd += [arg for k, v in self.options for arg in (f"--{k}", v)]
        return [*cmd, "--worker-urls", *engines]


def all_targets() -> list[RouterTarget]:
    """Every microserve policy; sglang-router's cache_aware as shipped and with the balance thresholds of
    microserve's prefix_aware (its own, 64 requests apart, never trigger with a few in flight per
    engine); every vllm-router policy."""
    ours = PrefixAware()
    balance = (
        ("balance-abs-threshold", str(ours.balance_abs)),
        ("balance-rel-threshold", str(ours.balance_rel)),
    )
    return [
        *(RouterTarget("microserve", p) for p in POLICIES),
        RouterTarget("sglang-router", "cache_aware"),
        RouterTarget("sglang-router", "cache_aware", balance),
        *(RouterTarget("vllm-router", p) for p in VLLM_POLICIES),
    ]


def parse_targets(text: str | None) -> list[RouterTarget]:
    """`router:policy[:key=value…]`, comma separated; none: every target."""
    if not text:
        return all_targets()
    targets = []
    for item in text.split(","):
        router, policy, *options = item.split(":")
        targets.append(RouterTarget(router, policy, tuple(_key_value(o) for o in options)))
    return targets


def _key_value(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key, value


# -- the engines ---------------------------------------------------------------------------------------


def sim_fleet(args: argparse.Namespace) -> contextlib.AbstractContextManager[list[str]]:
    """`args.engines` sim engines, started side by side; yields their URLs."""
    flags = ["--backend", "sim", "--num-kv-blocks", str(args.num_kv_blocks)]
    flags += ["--max-model-len", str(args.max_model_len)]
    if args.profile:
        flags += ["--sim-profile", args.profile]
    return engine_fleet(args.engines, *flags)


def engine_metrics(url: str) -> dict[str, float]:
    """The engine's prefix-cache and finished-request counters and its queue gauges, summed over labels."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = dict.fromkeys((HITS, QUERIES, DONE, RUNNING, WAITING), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def wait_idle(engines: list[str], timeout: float = 600.0) -> None:
    """Until no engine runs or queues anything (a slow target's abandoned requests may still be there)."""
    deadline = time.monotonic() + timeout
    while any(m[RUNNING] + m[WAITING] for m in map(engine_metrics, engines)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the engines still have work after {timeout:g} s")
        time.sleep(0.5)


async def flush(engines: list[str], args: argparse.Namespace, salt: int) -> None:
    """Fill every engine's KV cache with prompts seen nowhere else, one after another: each evicts the
    least recently used blocks first, so together they drop every block an earlier target left."""
    prompt_len = args.max_model_len - 8
    count = math.ceil(args.num_kv_blocks * BLOCK_SIZE / prompt_len) + 1

    async def fill(session: aiohttp.ClientSession, i: int, url: str) -> None:
        for k in range(count):
            ids = np.random.default_rng([salt, i, k]).integers(1000, 10000, size=prompt_len).tolist()
            body = {"model": MODEL, "prompt": ids, "max_tokens": 1}
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"flushing {url}: HTTP {resp.status}: {await resp.text()}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(fill(session, i, url) for i, url in enumerate(engines)))


# -- one target ----------------------------------------------------------------------------------------


def routable_workers(target: RouterTarget, url: str) -> int:
    """Workers the router will route to: microserve's /ready count, the peers' healthy /workers."""
    path = "/workers" if target.is_peer else "/ready"
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=2) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return 0
    if target.is_peer:
        return sum(1 for w in body.get("workers", []) if w.get("is_healthy"))
    return int(body.get("workers_available", 0))


def wait_for_workers(target: RouterTarget, proc: ManagedProcess, workers: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while routable_workers(target, proc.url) < workers:
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{target.name} did not come up with {workers} workers:\n{proc.output()}")
        time.sleep(0.2)


def workload(args: argparse.Namespace) -> MultiTurnWorkload:
    return MultiTurnWorkload(
        turns=args.turns,
        system_prompts=args.system_prompts,
        system_prompt_len=args.system_prompt_len,
        turn_len=args.turn_len,
        output_len=args.output_len,
        seed=0,
    )


def measure(target: RouterTarget, engines: list[str], args: argparse.Namespace, salt: int) -> dict[str, Any]:
    """Start the router, empty the engines' caches, run the workload through the router; one result row."""
    port = free_port()
    router = ManagedProcess(target.command(port, engines), f"http://127.0.0.1:{port}")
    client = Target(router.url, MODEL, request_timeout_s=args.request_timeout)
    config = RunConfig(request_rate=args.rate, num_requests=args.num_requests, seed=0)
    try:
        wait_for_workers(target, router, len(engines))
        wait_idle(engines)
        asyncio.run(flush(engines, args, salt))
        before = [engine_metrics(url) for url in engines]
        result = asyncio.run(run_benchmark(client, workload(args), config))
        after = [engine_metrics(url) for url in engines]
    finally:
        router.stop(timeout=10)
    summary = summarize(result.records, result.duration_s, (50.0, 99.0), skipped=result.skipped)
    return result_row(target, summary, before, after)


def result_row(
    target: RouterTarget, s: Summary, before: list[dict[str, float]], after: list[dict[str, float]]
) -> dict[str, Any]:
    def delta(key: str) -> list[float]:
        return [a[key] - b[key] for a, b in zip(after, before, strict=True)]

    queries = sum(delta(QUERIES))
    return {
        "target": target.name,
        "router": target.router,
        "policy": target.policy,
        "options": dict(target.options),
        "completed": s.completed,
        "failed": s.failed,
        "request_throughput": s.request_throughput,
        "output_throughput": s.output_throughput,
        "ttft_p50_ms": s.ttft.percentiles[50.0] if s.ttft else None,
        "ttft_p99_ms": s.ttft.percentiles[99.0] if s.ttft else None,
        "e2el_p50_ms": s.e2el.percentiles[50.0] if s.e2el else None,
        "e2el_p99_ms": s.e2el.percentiles[99.0] if s.e2el else None,
        "prefix_hit_rate": sum(delta(HITS)) / queries if queries else None,
        # Engines count a request when it ends, aborted ones included (a client that gave up).
        "requests_per_engine": [int(n) for n in delta(DONE)],
        "summary": s.to_dict(),
    }


# -- the report ----------------------------------------------------------------------------------------


def score(r: dict[str, Any]) -> float:
    """Lower is better: the geometric mean of TTFT p50 and p99; a target with failures ranks last."""
    if r["failed"] or r["ttft_p50_ms"] is None:
        return math.inf
    return math.sqrt(r["ttft_p50_ms"] * r["ttft_p99_ms"])


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    ours = [r for r in rows if r["router"] == "microserve"]
    peers = [r for r in rows if r["router"] != "microserve"]
    if not ours or not peers:
        return []
    best, peer = min(ours, key=score), min(peers, key=score)
    lines = [
        f"Best microserve policy: **{best['policy']}**; best peer: **{peer['target']}** (each ranked by the "
        "geometric mean of its TTFT p50 and p99, failures last). microserve against the peer:",
        "",
    ]
    for key, label in (("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99"), ("e2el_p99_ms", "E2E p99")):
        lines.append(
            f"- {label}: {best[key]:.0f} ms against {peer[key]:.0f} ms, {peer[key] / best[key]:.2f}x lower"
        )
    ours_rps, peer_rps = best["request_throughput"], peer["request_throughput"]
    lines.append(
        f"- throughput: {ours_rps:.2f} against {peer_rps:.2f} requests/s, {ours_rps / peer_rps:.2f}x"
    )
    lines.append(
        f"- prefix-cache hit rate: {best['prefix_hit_rate']:.1%} against {peer['prefix_hit_rate']:.1%}"
    )
    return lines


def table(rows: list[dict[str, Any]]) -> list[str]:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    out = [
        "| target | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | E2E p99 ms | hit rate "
        "| requests per engine | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        hit = "-" if r["prefix_hit_rate"] is None else f"{r['prefix_hit_rate']:.1%}"
        cells = [r["target"], f"{r['request_throughput']:.2f}", f"{r['output_throughput']:.0f}"]
        cells += [ms(r[k]) for k in ("ttft_p50_ms", "ttft_p99_ms", "e2el_p50_ms", "e2el_p99_ms")]
        cells += [hit, " ".join(map(str, r["requests_per_engine"])), str(r["failed"])]
        out.append("| " + " | ".join(cells) + " |")
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """TTFT p50 and p99 and the hit rate per target: microserve in blue, the peers in orange."""
    names = [r["target"] for r in rows]
    y = np.arange(len(rows))
    colors = ["tab:orange" if r["router"] != "microserve" else "tab:blue" for r in rows]
    fig = Figure(figsize=(13, 0.4 * len(rows) + 1.5), layout="constrained")
    ttft, hits = fig.subplots(1, 2, sharey=True, width_ratios=(2, 1))
    ttft.barh(y + 0.2, [r["ttft_p99_ms"] or 0 for r in rows], 0.4, color=colors, alpha=0.45)
    ttft.barh(y - 0.2, [r["ttft_p50_ms"] or 0 for r in rows], 0.4, color=colors)
    ttft.set_xscale("log")
    ttft.set_xlabel("TTFT (ms, log scale): solid p50, light p99")
    ttft.set_yticks(y, names, fontsize="small")
    ttft.invert_yaxis()
    hits.barh(y, [r["prefix_hit_rate"] or 0 for r in rows], color=colors)
    hits.set_xlabel("prefix-cache hit rate")
    hits.set_xlim(0, 1)
    for ax in (ttft, hits):
        ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=100)


def peer_versions() -> dict[str, str]:
    code = "import importlib.metadata as m; print(m.version('sglang-router'), m.version('vllm-router'))"
    out = subprocess.run([str(PEERS / "python"), "-c", code], capture_output=True, text=True, check=True)
    sglang, vllm = out.stdout.split()
    return {"sglang-router": sglang, "vllm-router": vllm}


def setup_line(args: argparse.Namespace) -> str:
    return (
        f"{args.engines} sim engines, each `--num-kv-blocks {args.num_kv_blocks}` "
        f"({args.num_kv_blocks * BLOCK_SIZE} tokens of KV) `--max-model-len {args.max_model_len}`, "
        f"cost model {args.profile or 'built-in'}; multi-turn workload: {args.system_prompts} system "
        f"prompts of {args.system_prompt_len} words, {args.turns} turns of {args.turn_len} words, answers of "
        f"{args.output_len} tokens, {args.num_requests} requests, Poisson {args.rate:g} requests/s, seed 0, "
        f"{args.request_timeout:g} s timeout a request"
    )


def write_markdown(path: Path, section: list[str]) -> None:
    """Replace the generated section of `path` (between the markers), keeping the prose around it."""
    text = path.read_text() if path.exists() else f"# Routing quality\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(head + BEGIN + "\n" + "\n".join(section) + "\n" + END + tail)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, meta: dict[str, Any]) -> None:
    peers = meta["peers"]
    lines = [
        f"`{meta['command']}`, {meta['date']}, {meta['machine']}; peers from PyPI: sglang-router "
        f"{peers['sglang-router']}, vllm-router {peers['vllm-router']}; {meta['wall_s'] / 60:.0f} minutes.",
        "",
        meta["setup"] + ".",
        "",
        *table(rows),
        "",
        *verdict(rows),
    ]
    print("\n".join(lines))
    if args.docs:
        docs = Path(args.docs)
        write_json(docs / "results" / "routing-quality.json", {**meta, "results": rows})
        plot(rows, docs / "routing-quality.png")
        write_markdown(docs / "routing-quality.md", [*lines, "", "![TTFT and hit rate](routing-quality.png)"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, default=8)
    p.add_argument("--num-kv-blocks", type=int, default=192, help="per engine, of 16 tokens")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--profile", default=None, help="the engines' cost model JSON (default: built-in)")
    p.add_argument("--rate", type=float, default=5.0, help="Poisson arrivals, requests/s")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds; past it a request failed")
    p.add_argument("--system-prompts", type=int, default=4)
    p.add_argument("--system-prompt-len", type=int, default=256)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--turn-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--targets", default=None, help="router:policy[:key=value…],… (default: all)")
    p.add_argument("--engine-urls", default=None, help="running engines to use, comma separated")
    p.add_argument("--docs", default=None, help="write results/routing-quality.json, .md and .png here")
    args = p.parse_args()

    started = time.perf_counter()
    given = args.engine_urls.split(",") if args.engine_urls else None
    rows = []
    with contextlib.nullcontext(given) if given else sim_fleet(args) as engines:
        for i, target in enumerate(parse_targets(args.targets)):
            rows.append(measure(target, engines, args, salt=i))
            print(f"{target.name}: done", file=sys.stderr, flush=True)
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": describe_machine(),
        "peers": peer_versions(),
        "command": " ".join(["python", *sys.argv]),
        "setup": setup_line(args),
        "args": vars(args),
        "wall_s": time.perf_counter() - started,
    }
    report(rows, args, meta)


if __name__ == "__main__":
    main()
