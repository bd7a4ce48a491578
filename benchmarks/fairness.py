"""Fair sharing measured: a quiet tenant's TTFT with a noisy tenant sending ten times its fair share beside
it, against the quiet tenant alone, with the router's fair share and with FIFO (--no-fair-share), over one
sim engine that costs what the real model costs on this machine. Open-loop Poisson arrivals.

Capacity C (requests/s) is measured first, closed-loop at the router's concurrency limit; the quiet tenant
then sends 0.25 C (half its share), the noisy one 5 C (ten times its share of C/2).

Usage: python benchmarks/fairness.py [--duration 20] [--out docs/results/fairness.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from microserve.machine import describe_machine
from microserve.processes import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "docs/profiles/smollm2-135m-fp32-2threads.json"
MODEL = "smollm2-135m"
KEYS = {"quiet": "sk-ms-quiet-tenant", "noisy": "sk-ms-noisy-tenant"}
CONCURRENCY = 4
GRACE_S = 10.0  # after the window, how long the quiet tenant's last requests may still take


def body(tenant: str, i: int) -> dict:
    text = f"{tenant} request {i}: summarise the history of caching in two sentences."
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16,
            "temperature": 0.7, "stream": True}  # fmt: skip


async def one(session: aiohttp.ClientSession, url: str, tenant: str, i: int) -> float | None:
    """TTFT in seconds, or None if refused."""
    start = time.perf_counter()
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    async with session.post(url, json=body(tenant, i), headers=headers) as resp:
        if resp.status != 200:
            await resp.read()
            return None
        await resp.content.readuntil(b"\n\n")
        ttft = time.perf_counter() - start
        await resp.read()
        return ttft


async def capacity(url: str, seconds: float = 6.0) -> float:
    done = 0
    async with aiohttp.ClientSession() as session:
        deadline = time.perf_counter() + seconds

        async def loop(k: int) -> None:
            nonlocal done
            i = 0
            while time.perf_counter() < deadline:
                await one(session, url, "noisy", k * 100_000 + i)
                done += 1
                i += 1

        start = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(CONCURRENCY)))
        return done / (time.perf_counter() - start)


async def open_loop(url: str, rates: dict[str, float], duration: float, seed: int) -> dict[str, dict]:
    rng = random.Random(seed)
    results: dict[str, list[float | None]] = {t: [] for t in rates}
    tasks: dict[str, list[asyncio.Task[float | None]]] = {t: [] for t in rates}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        arrivals = sorted(
            (t_at, tenant) for tenant, rate in rates.items() for t_at in _poisson(rng, rate, duration)
        )
        for i, (at, tenant) in enumerate(arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks[tenant].append(asyncio.create_task(one(session, url, tenant, i)))
        quiet = tasks.get("quiet", [])
        if quiet:
            await asyncio.wait(quiet, timeout=GRACE_S)
        for tenant, started in tasks.items():
            for task in started:
                if task.done() and not task.cancelled() and task.exception() is None:
                    results[tenant].append(task.result())
                else:
                    task.cancel()
                    results[tenant].append(float("inf"))  # still waiting at the end: censored
            with contextlib.suppress(BaseException):
                await asyncio.gather(*started, return_exceptions=True)
    return {tenant: _summary(values) for tenant, values in results.items()}


def _poisson(rng: random.Random, rate: float, duration: float) -> list[float]:
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return times
        times.append(t)


def _summary(values: list[float | None]) -> dict:
    served = sorted(v for v in values if v is not None)
    finite = [v for v in served if v != float("inf")]
    out = {"sent": len(values), "refused": sum(1 for v in values if v is None),
           "unanswered_in_window": len(served) - len(finite)}  # fmt: skip
    if served:
        out["ttft_p50_ms"] = round(1000 * served[len(served) // 2], 1)
        out["ttft_p99_ms"] = round(1000 * served[min(len(served) - 1, int(0.99 * len(served)))], 1)
    if finite:
        out["ttft_mean_ms"] = round(1000 * statistics.fmean(finite), 1)
    return out


def _finite(value: object) -> object:
    """Infinity (unanswered in the window) as null: standard JSON has no infinity."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and value == float("inf") else value


def start_router(engine: str, keys: Path, fifo: bool) -> ManagedProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "router", "--port", str(port),
           "--worker", f"{engine},kind=microserve", "--api-keys", str(keys),
           "--max-concurrent", str(CONCURRENCY), "--max-queued", "512",
           "--request-timeout", "120"]  # fmt: skip
    if fifo:
        cmd.append("--no-fair-share")
    router = ManagedProcess(cmd, f"http://127.0.0.1:{port}")
    router.wait_ready(timeout=60)
    return router


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    keys = Path(tempfile.mkdtemp(prefix="fairness-")) / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": t, "tenant": t, "key": k} for t, k in KEYS.items()]}))
    port = free_port()
    engine = ManagedProcess(
        [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
         "--sim-profile", str(PROFILE), "--port", str(port), "--threads", "1"],
        f"http://127.0.0.1:{port}",
    )  # fmt: skip
    runs: dict[str, dict] = {}
    try:
        engine.wait_ready(timeout=120)
        router = start_router(engine.url, keys, fifo=False)
        url = f"{router.url}/v1/chat/completions"
        cap = asyncio.run(capacity(url))
        quiet, noisy = 0.25 * cap, 5 * cap
        runs["quiet_alone"] = asyncio.run(open_loop(url, {"quiet": quiet}, args.duration, 1))
        runs["fair_share"] = asyncio.run(open_loop(url, {"quiet": quiet, "noisy": noisy}, args.duration, 2))
        router.stop()
        router = start_router(engine.url, keys, fifo=True)
        url = f"{router.url}/v1/chat/completions"
        runs["fifo"] = asyncio.run(open_loop(url, {"quiet": quiet, "noisy": noisy}, args.duration, 2))
        router.stop()
    finally:
        engine.stop()
    alone = runs["quiet_alone"]["quiet"]["ttft_p99_ms"]
    report = {
        "machine": describe_machine(),
        "date": dt.date.today().isoformat(),
        "profile": PROFILE.name,
        "router": f"--max-concurrent {CONCURRENCY}, one sim engine",
        "capacity_rps": round(cap, 2),
        "rates_rps": {"quiet": round(quiet, 2), "noisy": round(noisy, 2)},
        "duration_s": args.duration,
        "runs": runs,
        "quiet_ttft_p99_over_alone": {
            name: round(run["quiet"]["ttft_p99_ms"] / alone, 2) for name, run in runs.items()
        },
        "note": "null: p50/p99 not reached because that share of requests was still unanswered when the "
        "window (plus 10 s grace) ended",
    }
    text = json.dumps(_finite(report), indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
