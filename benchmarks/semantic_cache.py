"""The semantic cache measured: on benchmarks/data/paraphrases.jsonl (pairs that should match and pairs
that should not), the hit rate and the false-hit rate at several thresholds with the bundled model's
embeddings, for each embedding style; then through a router, the latency of a semantic hit against an
exact hit and a miss (a torch engine computing 16 tokens). Sequential requests, one client.

Usage: python benchmarks/semantic_cache.py [--repeats 50] [--out docs/results/semantic-cache.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp

from microserve.machine import describe_machine
from microserve.processes import ManagedProcess, free_port, start_engine
from microserve.tenants.cache import CACHE_HEADER
from microserve.tenants.semantic import DEFAULT_THRESHOLD, FleetEmbedder

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks/data/paraphrases.jsonl"
MODEL = "smollm2-135m"
ENGINE_ARGS = ("--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory", "128MiB")
THRESHOLDS = (0.90, 0.95, 0.97, 0.98, 0.985, 0.99, 0.995)
MAX_FALSE_HITS = 0.05  # the default threshold: the most hits with at most this share of false ones


def load_pairs() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


async def similarities(engine: str, style: str, pairs: list[dict]) -> list[float]:
    async with aiohttp.ClientSession() as session:

        async def forward(path: str, body: bytes) -> tuple[int, bytes]:
            headers = {"Content-Type": "application/json"}
            async with session.post(engine + path, data=body, headers=headers) as resp:
                return resp.status, await resp.read()

        embed = FleetEmbedder(forward, MODEL, style)
        texts = sorted({t for p in pairs for t in (p["a"], p["b"])})
        vectors = {t: await embed(MODEL, t) for t in texts}
    return [float(vectors[p["a"]] @ vectors[p["b"]]) for p in pairs]


def unrelated(pairs: list[dict]) -> list[dict]:
    """Questions on different subjects: each matching pair's first question against the next pair's
    paraphrase (the set's near misses change one thing only; these change everything)."""
    matching = [p for p in pairs if p["match"]]
    return [
        {"a": p["a"], "b": matching[(i + 1) % len(matching)]["b"], "match": False}
        for i, p in enumerate(matching)
    ]


def rates(pairs: list[dict], sims: list[float], others: list[float]) -> list[dict[str, float]]:
    should = [s for p, s in zip(pairs, sims, strict=True) if p["match"]]
    should_not = [s for p, s in zip(pairs, sims, strict=True) if not p["match"]]
    return [
        {
            "threshold": t,
            "hit_rate": round(sum(s >= t for s in should) / len(should), 3),
            "false_hit_rate": round(sum(s >= t for s in should_not) / len(should_not), 3),
            "unrelated_false_hit_rate": round(sum(s >= t for s in others) / len(others), 3),
        }
        for t in THRESHOLDS
    ]


def choose(table: list[dict[str, float]]) -> dict[str, float]:
    allowed = [row for row in table if row["false_hit_rate"] <= MAX_FALSE_HITS]
    return max(allowed, key=lambda row: (row["hit_rate"], -row["threshold"])) if allowed else table[-1]


def chat(question: str, stream: bool = False) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 16,
            "temperature": 0, "stream": stream}  # fmt: skip


async def timed(
    session: aiohttp.ClientSession, url: str, payload: dict, expect: str, headers: dict | None = None
) -> float:
    start = time.perf_counter()
    async with session.post(url, json=payload, headers=headers) as resp:
        await resp.read()
        got = resp.headers.get(CACHE_HEADER)
        assert resp.status == 200 and got == expect, (resp.status, got, payload)
    return (time.perf_counter() - start) * 1000


def summary(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 2), "max_ms": round(max(ms), 2)}


async def latency(router: str, pairs: list[dict], sims: list[float], threshold: float, repeats: int) -> dict:
    url = f"{router}/v1/chat/completions"
    hits = [p for p, s in zip(pairs, sims, strict=True) if p["match"] and s >= threshold]
    if not hits:
        raise SystemExit(f"no pair of the set matches at {threshold}: no semantic hit to time")
    async with aiohttp.ClientSession() as session:
        first, paraphrase = hits[0]["a"], hits[0]["b"]
        # A miss: computed afresh (no-cache), after the same lookups a miss makes, the embedding included.
        fresh = {"Cache-Control": "no-cache"}
        miss = [await timed(session, url, chat(first), "miss", fresh) for _ in range(repeats)]
        await timed(session, url, chat(first), "hit")
        exact = [await timed(session, url, chat(first), "hit") for _ in range(repeats)]
        semantic = [await timed(session, url, chat(paraphrase), "semantic-hit") for _ in range(repeats)]
        await timed(session, url, chat(first, stream=True), "miss")
        stream = [
            await timed(session, url, chat(paraphrase, stream=True), "semantic-hit") for _ in range(repeats)
        ]
    return {"miss": summary(miss), "exact_hit": summary(exact), "semantic_hit": summary(semantic),
            "semantic_hit_stream": summary(stream)}  # fmt: skip


def start_router(engine: str, threshold: float) -> ManagedProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "router", "--port", str(port),
           "--worker", f"{engine},kind=microserve", "--response-cache", "memory",
           "--semantic-cache", str(threshold)]  # fmt: skip
    router = ManagedProcess(cmd, f"http://127.0.0.1:{port}")
    router.wait_ready(timeout=60)
    return router


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    pairs = load_pairs()
    engine = start_engine(*ENGINE_ARGS, timeout=300)
    started = [engine]
    report: dict = {
        "machine": describe_machine(),
        "date": dt.date.today().isoformat(),
        "model": MODEL,
        "pairs": {"match": sum(p["match"] for p in pairs), "no_match": sum(not p["match"] for p in pairs)},
        "styles": {},
    }
    try:
        sims_by_style = {}
        for style in ("prompt-last", "mean"):  # "plain" is "mean" on a microserve engine
            sims = asyncio.run(similarities(engine.url, style, pairs))
            others = asyncio.run(similarities(engine.url, style, unrelated(pairs)))
            sims_by_style[style] = sims
            table = rates(pairs, sims, others)
            report["styles"][style] = {"table": table, "best_within_5pct_false_hits": choose(table)}
            print(style, json.dumps(report["styles"][style]), flush=True)
        router = start_router(engine.url, DEFAULT_THRESHOLD)
        started.append(router)
        report["latency"] = {
            "threshold": DEFAULT_THRESHOLD,
            "request": "chat, 16 tokens, temperature 0, no keys, memory cache, default style",
            **asyncio.run(
                latency(router.url, pairs, sims_by_style["prompt-last"], DEFAULT_THRESHOLD, args.repeats)
            ),
        }
    finally:
        for proc in reversed(started):
            proc.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
