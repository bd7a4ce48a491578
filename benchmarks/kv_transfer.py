"""KV transfer between two engines on this machine, all figures from one run.

- transfer throughput (MB/s, tokens/s): remote_send of a context the sender already holds in its cache;
- migrating a 2,048-token context (prep_recv -> remote_send -> release) against recomputing it on the
  receiver (a cold prefill of the same tokens);
- overlap: remote_send of a cold context (compute and send overlapped, chunk by chunk) against the sum
  of computing alone and sending alone.

Usage: python benchmarks/kv_transfer.py [--dtype float32] [--tokens 2048] [--reps 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import statistics
import time
from pathlib import Path

import torch

from microserve.engine_client import EngineClient
from microserve.machine import cpu_name
from microserve.processes import engine_process
from microserve.tokens import INTERNAL_TOKEN_ENV, generate_token


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


async def timed(coro) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = await coro
    return time.perf_counter() - t0, result


async def measure(a: EngineClient, b: EngineClient, n: int, reps: int) -> dict:
    rng = random.Random(0)
    await a.completions(prompt=ids(rng, 64), max_tokens=2)  # warm-up both engines
    await b.completions(prompt=ids(rng, 64), max_tokens=2)
    transfer, migrate, recompute, compute_alone, overlapped = [], [], [], [], []
    sizes = []
    for rep in range(reps):
        # Transfer alone: the sender holds the context in its prefix cache already.
        ctx = ids(rng, n)
        await a.completions(prompt=[*ctx, 7], max_tokens=1)
        t_migrate_0 = time.perf_counter()
        addr = await b.prep_recv(f"t{rep}", ctx)
        t_send, sent = await timed(a.remote_send(f"t{rep}", ctx, addr, b))
        await b.release(f"t{rep}")
        migrate.append(time.perf_counter() - t_migrate_0)
        transfer.append(t_send)
        sizes.append(sent)
        # Recompute on the receiver: a cold prefill of a same-length context.
        t, _ = await timed(b.completions(prompt=ids(rng, n), max_tokens=1))
        recompute.append(t)
        # Compute alone on the sender (cold), and compute+send overlapped (cold).
        t, _ = await timed(a.completions(prompt=ids(rng, n), max_tokens=1))
        compute_alone.append(t)
        cold = ids(rng, n)
        addr = await b.prep_recv(f"o{rep}", cold)
        t, _ = await timed(a.remote_send(f"o{rep}", cold, addr, b))
        overlapped.append(t)
        await b.release(f"o{rep}")
    med = statistics.median
    size = sizes[0]
    return {
        "tokens": size["sent_tokens"],
        "bytes": size["bytes"],
        "transfer_s": med(transfer),
        "transfer_MB_s": size["bytes"] / med(transfer) / 1e6,
        "transfer_tokens_s": size["sent_tokens"] / med(transfer),
        "migrate_s": med(migrate),
        "recompute_s": med(recompute),
        "compute_alone_s": med(compute_alone),
        "overlapped_s": med(overlapped),
    }


async def run(args: argparse.Namespace) -> dict:
    common = (
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(max(4096, args.tokens + 64)),
        "--kv-cache-memory",
        "1GiB",
    )
    token = generate_token()  # KV moves only between engines that share it
    env = {INTERNAL_TOKEN_ENV: token}
    with (
        engine_process(*common, threads=1, env=env) as a_url,
        engine_process(*common, threads=1, env=env) as b_url,
    ):
        async with (
            EngineClient(a_url, internal_token=token) as a,
            EngineClient(b_url, internal_token=token) as b,
        ):
            return await measure(a, b, args.tokens, args.reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    r = asyncio.run(run(args))
    date = dt.date.today().isoformat()
    machine = f"{cpu_name()}, two engines x 1 thread, torch {torch.__version__}, {args.dtype}"
    print(f"# KV transfer — {date}, {machine}")
    print("| figure | value |\n|---|---|")
    print(f"| context | {r['tokens']} tokens, {r['bytes'] / 1e6:.1f} MB |")
    print(f"| transfer throughput | {r['transfer_MB_s']:.0f} MB/s, {r['transfer_tokens_s']:.0f} tokens/s |")
    print(
        f"| migrate {r['tokens']} tokens (prep_recv, remote_send, release) | {r['migrate_s'] * 1e3:.0f} ms |"
    )
    print(f"| recompute them on the receiver (cold prefill) | {r['recompute_s'] * 1000:.0f} ms |")
    print(f"| migrate / recompute | {r['migrate_s'] / r['recompute_s']:.2f}x |")
    serial = r["compute_alone_s"] + r["transfer_s"]
    print(f"| cold remote_send (compute + send overlapped) | {r['overlapped_s'] * 1000:.0f} ms |")
    print(f"| compute alone + send alone (serial) | {serial * 1000:.0f} ms |")
    print(f"| overlap saves | {(1 - r['overlapped_s'] / serial):.0%} |")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"date": date, "machine": cpu_name(), "dtype": args.dtype, **r}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
