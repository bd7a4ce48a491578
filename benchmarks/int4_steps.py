"""In-process engine step times, dequantized bf16 weights (`--quantization none`) against int4, same run.

Decode steps at several batch sizes (every sequence decoding, 128-token contexts) and one 512-token
prefill; for int4 also with the kernel forced on every batch, to show where it stops paying.

Usage: python benchmarks/int4_steps.py [--threads 2] [--batches 1,4,8,32] [--steps 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import time

import torch
from decode_steps import step_times

from microserve.engine.config import CacheConfig, EngineConfig
from microserve.engine.core import EngineCore
from microserve.engine.scheduler import SchedulerConfig
from microserve.engine_builder import build_core
from microserve.machine import describe_machine
from microserve.model.layers.linear import Int4Linear

PROMPT_LEN = 128


def _set_kernel_rows(core: EngineCore, rows: int | str | None) -> None:
    """Force the int4 layers' row limit (None: the kernel always); "auto" keeps the engine's own."""
    if rows == "auto":
        return
    for layer in core.runner.model.layers:
        for lin in layer.linears():
            if isinstance(lin, Int4Linear):
                lin.max_kernel_rows = rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,4,8,32")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{describe_machine()}; torch {torch.__version__}; {args.threads} threads; bf16")
    print(f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
    results: dict[str, dict[str, float]] = {}
    for quantization in ("none", "int4"):
        start = time.perf_counter()
        core = build_core(
            EngineConfig(
                dtype="bfloat16",
                quantization=quantization,
                threads=args.threads,
                max_model_len=2048,
                cache=CacheConfig(memory_bytes=1 << 30, enable_prefix_caching=False),
                scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512),
            )
        )
        print(f"{quantization}: built in {time.perf_counter() - start:.1f} s")
        variants: list[tuple[str, int | str | None]] = [("none", "auto")]
        if quantization == "int4":
            variants = [("int4", "auto"), ("int4 kernel always", None)]
        for name, rows in variants:
            _set_kernel_rows(core, rows)
            results[name] = step_times(core, batches, args.steps, PROMPT_LEN)
            print(name, {k: round(v, 1) for k, v in results[name].items()}, flush=True)
        del core
        gc.collect()
    print(f"\n{'step (median ms)':>18} " + " ".join(f"{n:>20}" for n in results) + "   none / int4")
    for key in results["none"]:
        cells = " ".join(f"{results[n][key]:>20.1f}" for n in results)
        print(f"{key:>18} {cells}   {results['none'][key] / results['int4'][key]:>10.2f}x")


if __name__ == "__main__":
    main()
