"""How fast benchmark (a) of the engine could be on this machine, from the bytes a decode step must read.

Benchmark (a) (benchmarks/engine_vs_transformers.py) runs 32 concurrent requests of 128 prompt and 128
output tokens. Each decode step of that batch must read every weight once and the K/V of every context;
on a CPU whose memory bandwidth is B, a step cannot take less than bytes / B. This script measures B
(the best of three kernels reading 1 GiB with the engine's thread count), counts the bytes per step for
each weight format, measures our prefill of the batch in-process, and prints the throughput (a) could
reach if every decode step ran at that floor: an upper bound, against the `transformers` figure of the
last run (docs/results/engine-<dtype>.json).

Usage: python benchmarks/roofline.py [--threads 2] [--out docs/results/roofline.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import time
from pathlib import Path

import torch

from microserve.engine.config import EngineConfig
from microserve.engine.sampling import SamplingParams
from microserve.engine_builder import build_core
from microserve.machine import cpu_name
from microserve.model.config import ModelConfig
from microserve.model.loader import load_config, resolve_model

BATCH, PROMPT_LEN, OUTPUT_LEN = 32, 128, 128
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
# Bytes per weight: Q4_1 packs 32 weights in 16 bytes of nibbles plus a 2-byte scale and a 2-byte minimum.
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "int4 (Q4_1)": 20 / 32}


def read_bandwidth(threads: int) -> dict[str, float]:
    """Bytes/s torch reads from memory over 1 GiB, by three kernels (median of 7 each).

    The best of them is the bandwidth: a reduction can be compute-bound before it is memory-bound (a bf16
    sum converts every element), while a matrix-vector product streams its matrix like a decode step
    streams its weights.
    """
    torch.set_num_threads(threads)
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    kernels = {
        "bf16 sum": lambda: x.view(torch.bfloat16).sum(),
        "fp32 sum": lambda: x.sum(),
        "fp32 matrix-vector": lambda: x.view(-1, 1024) @ x[:1024],
    }
    speeds = {}
    for name, run in kernels.items():
        run()
        times = []
        for _ in range(7):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        speeds[name] = x.numel() * x.element_size() / statistics.median(times)
    return speeds


def weights_per_step(c: ModelConfig) -> int:
    """Weights a decode step reads: every layer's projections and the LM head (embedding rows: few)."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * layer + c.vocab_size * c.hidden_size


def kv_bytes_per_step(c: ModelConfig, elem: int) -> float:
    """K and V of every context read by one step, averaged over the OUTPUT_LEN steps of benchmark (a)."""
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * elem
    mean_context = PROMPT_LEN + (OUTPUT_LEN + 1) / 2
    return BATCH * mean_context * per_token


def prefill_seconds(dtype: str, threads: int) -> float:
    """Our in-process time to prefill the 32 prompts of benchmark (a) (median of 3)."""
    core = build_core(EngineConfig(model="smollm2-135m", dtype=dtype, quantization="none", threads=threads))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for r in range(4):
        for i in range(BATCH):
            core.add_request(f"{r}-{i}", [rng.randrange(100, 49000) for _ in range(PROMPT_LEN)], params)
        start = time.perf_counter()
        while core.has_work():
            core.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    config = load_config(resolve_model("smollm2-135m"))
    speeds = read_bandwidth(args.threads)
    bandwidth = max(speeds.values())
    n_weights = weights_per_step(config)
    rows = []
    for dtype in ("float32", "bfloat16"):
        measured = json.loads((RESULTS / f"engine-{dtype}.json").read_text())
        transformers = measured["transformers"]["throughput_tok_s"]
        ours = measured["microserve"]["throughput_tok_s"]
        prefill = prefill_seconds(dtype, args.threads)
        kv = kv_bytes_per_step(config, 4 if dtype == "float32" else 2)
        for fmt, per_weight in WEIGHT_BYTES.items():
            if (fmt == "float32") != (dtype == "float32"):
                continue  # fp32 weights with fp32 math; bf16 or packed int4 weights with bf16 math
            step_bytes = n_weights * per_weight + kv
            step_s = step_bytes / bandwidth
            ceiling = BATCH * OUTPUT_LEN / (prefill + OUTPUT_LEN * step_s)
            rows.append(
                {
                    "compute dtype": dtype,
                    "weights": fmt,
                    "MB per step": step_bytes / 1e6,
                    "step floor ms": step_s * 1e3,
                    "prefill s (ours, measured)": prefill,
                    "ceiling tok/s": ceiling,
                    "ours tok/s (last run)": ours,
                    "transformers tok/s (last run)": transformers,
                    "ceiling / transformers": ceiling / transformers,
                }
            )
    date = dt.date.today().isoformat()
    print(f"# roofline of benchmark (a) — {date}, {cpu_name()}, {args.threads} threads")
    by_kernel = ", ".join(f"{name} {speed / 1e9:.1f}" for name, speed in speeds.items())
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (best of {by_kernel})")
    print(f"{n_weights / 1e6:.1f} M weights read per decode step")
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    if args.out:
        doc = {
            "date": date,
            "machine": cpu_name(),
            "threads": args.threads,
            "read_bandwidth_Bps": bandwidth,
            "read_bandwidth_by_kernel_Bps": speeds,
        }
        Path(args.out).write_text(json.dumps({**doc, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
