"""The response cache's hit latency through the router against a miss (the same request computed by a
sim engine that costs what the real model costs on this machine), with the memory cache and with Redis,
keys on (the hit path includes the key lookup and the limits). Sequential requests, one client.

Usage: python benchmarks/response_cache.py [--hits 300] [--misses 30] [--out docs/results/response-cache.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from microserve.machine import describe_machine
from microserve.processes import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "docs/profiles/smollm2-135m-fp32-2threads.json"
MODEL = "smollm2-135m"
SECRET = "sk-ms-benchmark-key"


def body(i: int, stream: bool = False) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Question {i}: what is a cache?"}],
            "max_tokens": 16, "temperature": 0, "stream": stream}  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 3), "p99_ms": round(percentile(ms, 0.99), 3)}


async def timed(session: aiohttp.ClientSession, url: str, payload: dict, expect: str) -> float:
    start = time.perf_counter()
    async with session.post(url, json=payload, headers={"Authorization": f"Bearer {SECRET}"}) as resp:
        await resp.read()
        assert resp.status == 200 and resp.headers["x-microserve-cache"] == expect, resp.headers
    return (time.perf_counter() - start) * 1000


async def measure(router: str, hits: int, misses: int, base: int) -> dict[str, dict[str, float]]:
    url = f"{router}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        miss = [await timed(session, url, body(base + i), "miss") for i in range(misses)]
        await timed(session, url, body(base + 10_000), "miss")
        await timed(session, url, body(base + 10_000, stream=True), "miss")
        for _ in range(20):  # warm-up
            await timed(session, url, body(base + 10_000), "hit")
        hit = [await timed(session, url, body(base + 10_000), "hit") for _ in range(hits)]
        hit_stream = [await timed(session, url, body(base + 10_000, stream=True), "hit") for _ in range(hits)]
    return {"miss": summary(miss), "hit": summary(hit), "hit_stream": summary(hit_stream)}


def start_router(engine: str, keys: Path, cache: str) -> ManagedProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "router", "--port", str(port),
           "--worker", f"{engine},kind=microserve", "--api-keys", str(keys),
           "--response-cache", cache]  # fmt: skip
    router = ManagedProcess(cmd, f"http://127.0.0.1:{port}")
    router.wait_ready(timeout=60)
    return router


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hits", type=int, default=300)
    p.add_argument("--misses", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    work = Path(__import__("tempfile").mkdtemp(prefix="cache-bench-"))
    keys = work / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "bench", "tenant": "bench", "key": SECRET}]}))
    engine_port = free_port()
    engine = ManagedProcess(
        [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
         "--sim-profile", str(PROFILE), "--port", str(engine_port), "--threads", "1"],
        f"http://127.0.0.1:{engine_port}",
    )  # fmt: skip
    started: list[ManagedProcess] = [engine]
    redis = None
    results: dict[str, dict] = {}
    try:
        engine.wait_ready(timeout=120)
        caches = {"memory": "memory"}
        if shutil.which("redis-server"):
            redis_port = free_port()
            redis = subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
                stdout=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            caches["redis"] = f"redis://127.0.0.1:{redis_port}/0"
        for n, (name, source) in enumerate(caches.items()):
            router = start_router(engine.url, keys, source)
            started.append(router)
            results[name] = asyncio.run(measure(router.url, args.hits, args.misses, n * 100_000))
            router.stop()
    finally:
        for proc in reversed(started):
            proc.stop()
        if redis is not None:
            redis.terminate()
    report = {
        "machine": describe_machine(),
        "date": dt.date.today().isoformat(),
        "profile": PROFILE.name,
        "request": "chat, 16 tokens, temperature 0, keys on",
        "results": results,
        "miss_over_hit_p50": {
            k: round(v["miss"]["p50_ms"] / v["hit"]["p50_ms"], 1) for k, v in results.items()
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
