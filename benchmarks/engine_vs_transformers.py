"""Engine benchmark against transformers on this machine, all figures from one run, same model and dtype.

(a) output throughput: 32 concurrent requests (128 prompt, 128 output tokens) through our HTTP API vs
    transformers `generate` on a static batch of 32;
(b) single-stream decode tok/s, ours vs transformers, with the implied GB/s of weight traffic;
(c) TTFT of a request whose 1,024-token prefix is cached, against the same request cold.

Usage: python benchmarks/engine_vs_transformers.py [--dtype float32] [--threads 2] [--out results.json]
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

import httpx
import orjson
import torch

from microserve.machine import cpu_name
from microserve.model.loader import resolve_model
from microserve.processes import engine_process

PROMPT_LEN, OUTPUT_LEN, CONCURRENCY = 128, 128, 32
SINGLE_OUTPUT = 256
PREFIX_LEN, SUFFIX_LEN = 1024, 16


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(n)]


async def stream_one(
    client: httpx.AsyncClient, prompt: list[int], max_tokens: int
) -> tuple[float, list[float]]:
    """(TTFT, arrival time of each output chunk) for one streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    start = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = orjson.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("text"):
                    arrivals.append(time.perf_counter())
    return arrivals[0] - start, arrivals


async def ours(url: str, rng: random.Random) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await stream_one(c, random_ids(rng, 32), 8)  # warm-up
        # (a) throughput
        prompts = [random_ids(rng, PROMPT_LEN) for _ in range(CONCURRENCY)]
        t0 = time.perf_counter()
        bodies = [
            c.post(
                "/v1/completions",
                json={"prompt": p, "max_tokens": OUTPUT_LEN, "ignore_eos": True, "temperature": 0},
            )
            for p in prompts
        ]
        results = [r.json() for r in await asyncio.gather(*bodies)]
        elapsed = time.perf_counter() - t0
        out_tokens = sum(r["usage"]["completion_tokens"] for r in results)
        assert out_tokens == CONCURRENCY * OUTPUT_LEN, out_tokens
        # (b) single stream decode
        _, arrivals = await stream_one(c, random_ids(rng, 32), SINGLE_OUTPUT)
        decode_tps = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
        # (c) cached-prefix TTFT vs cold, median of 5 fresh prefixes each
        cold, warm = [], []
        for _ in range(5):
            prefix = random_ids(rng, PREFIX_LEN)
            ttft, _ = await stream_one(c, prefix + random_ids(rng, SUFFIX_LEN), 1)
            cold.append(ttft)
            ttft, _ = await stream_one(c, prefix + random_ids(rng, SUFFIX_LEN), 1)
            warm.append(ttft)
        return {
            "throughput_tok_s": out_tokens / elapsed,
            "throughput_wall_s": elapsed,
            "single_decode_tok_s": decode_tps,
            "ttft_cold_s": statistics.median(cold),
            "ttft_cached_prefix_s": statistics.median(warm),
        }


def transformers_side(dtype: torch.dtype, rng: random.Random) -> dict:
    from transformers import AutoModelForCausalLM

    path = resolve_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()

    def generate(ids: torch.Tensor, n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
            )
        return time.perf_counter() - t0

    generate(torch.tensor([random_ids(rng, 32)]), 4)  # warm-up
    batch = torch.tensor([random_ids(rng, PROMPT_LEN) for _ in range(CONCURRENCY)])
    elapsed = generate(batch, OUTPUT_LEN)
    single = torch.tensor([random_ids(rng, 32)])
    prefill = generate(single, 1)
    total = generate(single, SINGLE_OUTPUT)
    params = sum(p.numel() for p in model.parameters())
    return {
        "throughput_tok_s": CONCURRENCY * OUTPUT_LEN / elapsed,
        "throughput_wall_s": elapsed,
        "single_decode_tok_s": (SINGLE_OUTPUT - 1) / (total - prefill),
        "params": params,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)

    with engine_process(
        "--dtype", args.dtype, "--max-model-len", "2048", "--kv-cache-memory", "1GiB", threads=args.threads
    ) as url:
        mine = asyncio.run(ours(url, rng))
    theirs = None if args.skip_transformers else transformers_side(getattr(torch, args.dtype), rng)

    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    params = theirs["params"] if theirs else 134_515_008
    weight_bytes = params * itemsize
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{cpu_name()}, {args.threads} threads",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "microserve": mine,
        "transformers": theirs,
        "weight_bytes": weight_bytes,
    }
    print(
        f"# engine benchmark — {report['date']}, {report['machine']}, torch {torch.__version__}, {args.dtype}"
    )
    rows = [
        ("(a) output tok/s, 32 concurrent x 128/128", "throughput_tok_s"),
        ("(b) single-stream decode tok/s", "single_decode_tok_s"),
    ]
    print("| figure | microserve | transformers | ratio |\n|---|---|---|---|")
    for label, key in rows:
        ours_v = mine[key]
        if theirs:
            print(f"| {label} | {ours_v:.1f} | {theirs[key]:.1f} | {ours_v / theirs[key]:.2f}x |")
        else:
            print(f"| {label} | {ours_v:.1f} | - | - |")
    gbs = mine["single_decode_tok_s"] * weight_bytes / 1e9
    print(
        f"| (b) implied weight traffic, single stream | {gbs:.1f} GB/s | "
        + (f"{theirs['single_decode_tok_s'] * weight_bytes / 1e9:.1f} GB/s" if theirs else "-")
        + " | |"
    )
    ratio = mine["ttft_cached_prefix_s"] / mine["ttft_cold_s"]
    print(
        f"| (c) TTFT, 1,024-token prefix cached / cold | {mine['ttft_cached_prefix_s'] * 1000:.0f} ms / "
        f"{mine['ttft_cold_s'] * 1000:.0f} ms | | {ratio:.1%} |"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
