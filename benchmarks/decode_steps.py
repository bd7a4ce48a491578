"""In-process engine step times in bf16, dense weights: what each of the engine's CPU speed-ups buys.

Variants (each a fresh engine, same run): `plain` weights, which F.linear hands oneDNN to reorder on
every call; `oneDNN` ones, kept in oneDNN's layout from load (`model/layers/linear.pack_for_onednn`);
`AMX` tiles for microserve's own GEMM (`model/layers/linear.pack_for_amx`); with torch's ops only, or with
microserve's CPU kernels (`microserve/kernels`: decode attention over the paged blocks, fused RMSNorm,
SwiGLU and RoPE, greedy argmax) — AMX + kernels is today's engine on a CPU with AMX. Decode steps at
several batch sizes (every sequence decoding, 192-token contexts) and one 512-token prefill. Run it with
PYTHONPATH set to another checkout to time an older engine the same way (variants it lacks are skipped;
checkouts from before `model/layers` keep the linear layers in `model/quant`).

Usage: python benchmarks/decode_steps.py [--threads 2] [--batches 1,8,32] [--steps 20] [--out x.json]
       [--variants 'AMX, kernels;oneDNN, torch ops']
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import random
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

import microserve.kernels
from microserve.engine.config import CacheConfig, EngineConfig
from microserve.engine.core import EngineCore
from microserve.engine.sampling import SamplingParams
from microserve.engine.scheduler import SchedulerConfig
from microserve.engine_builder import build_core
from microserve.machine import describe_machine

try:
    from microserve.model.layers import linear as quant  # where the linear layers live
except ImportError:  # an older checkout: the linear layers in model/quant
    from microserve.model import quant  # type: ignore[no-redef]

CONTEXT_LEN, PREFILL_LEN = 192, 512


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(n)]


def decode_step_ms(core: EngineCore, batch: int, steps: int, rng: random.Random, context: int) -> float:
    """Median time of a step in which `batch` sequences each decode one token after `context` tokens."""
    params = SamplingParams(max_tokens=1024, temperature=0.0, ignore_eos=True)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid in ids:
        core.add_request(rid, _ids(rng, context), params)
    while core.num_waiting or any(s.num_computed_tokens < context for s in core.scheduler.running):
        core.step()
    core.step()  # the first pure decode step, after the last prefill
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - start)
    for rid in ids:
        core.abort_request(rid)
    return statistics.median(times) * 1e3


def prefill_ms(core: EngineCore, repeats: int, rng: random.Random) -> float:
    """Median time of the step that prefills one fresh 512-token prompt."""
    times = []
    for i in range(repeats):
        core.add_request(f"p{i}", _ids(rng, PREFILL_LEN), SamplingParams(max_tokens=1, temperature=0.0))
        start = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - start)
        while core.has_work():
            core.step()
    return statistics.median(times) * 1e3


def step_times(core: EngineCore, batches: list[int], steps: int, context: int) -> dict[str, float]:
    """Median decode step at each batch size (contexts of `context` tokens), and a 512-token prefill."""
    rng = random.Random(0)
    row = {f"decode b={b}": decode_step_ms(core, b, steps, rng, context) for b in batches}
    row["prefill 512"] = prefill_ms(core, 5, rng)
    return row


@contextmanager
def kernels_off():
    """Build with microserve's CPU kernels off, as where they cannot be built: the model's layers (and the
    sampler) choose torch's ops when built."""
    saved = list(microserve.kernels._loaded)
    microserve.kernels._loaded[:] = [None]
    try:
        yield
    finally:
        microserve.kernels._loaded[:] = saved


def _linears(layer) -> list:
    return list(layer.values()) if isinstance(layer, dict) else list(layer.linears())


@contextmanager
def weight_layout(layout: str):
    """Build with weights `plain` (F.linear), in oneDNN's layout, or as AMX tiles (the default)."""
    patched = {"plain": ["pack_for_amx", "pack_for_onednn"], "oneDNN": ["pack_for_amx"], "AMX": []}[layout]
    saved = {name: getattr(quant, name) for name in patched if hasattr(quant, name)}
    for name in saved:
        setattr(quant, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(quant, name, fn)


def build(threads: int, quantization: str) -> EngineCore:
    return build_core(
        EngineConfig(
            dtype="bfloat16",
            quantization=quantization,
            threads=threads,
            max_model_len=2048,
            cache=CacheConfig(memory_bytes=1 << 30, enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quantization", default="none", choices=["none", "auto"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variants", help="semicolon-separated subset of the variants' names (default: all)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    header = f"{describe_machine()}; torch {torch.__version__}; {args.threads} threads; bf16"
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    print(header, date, sep="\n")
    available = {
        "plain": True,
        "oneDNN": hasattr(quant, "pack_for_onednn"),
        "AMX": hasattr(quant, "pack_for_amx"),
    }
    results: dict[str, dict[str, float]] = {}
    variants = [
        ("plain, torch ops", "plain", False),
        ("oneDNN, torch ops", "oneDNN", False),
        ("oneDNN, kernels", "oneDNN", True),
        ("AMX, kernels", "AMX", True),
    ]
    if args.variants:
        wanted = {v.strip() for v in args.variants.split(";")}
        variants = [v for v in variants if v[0] in wanted]
    for name, layout, kernels in variants:
        if not available[layout]:
            continue
        with weight_layout(layout), kernels_off() if not kernels else nullcontext():
            core = build(args.threads, args.quantization)
        model = core.runner.model
        if layout == "AMX" and not any(
            getattr(lin, "tiles", None) is not None for lin in _linears(model.layers[0])
        ):
            continue  # no AMX here (or no kernels): the same as oneDNN
        if kernels and getattr(model, "kernels", None) is None:
            continue
        results[name] = step_times(core, batches, args.steps, CONTEXT_LEN)
        print(name, {k: round(v, 1) for k, v in results[name].items()}, flush=True)
        del core
        gc.collect()
    print(f"\n{'step (median ms)':>18} " + " ".join(f"{n:>16}" for n in results))
    for key in next(iter(results.values())):
        print(f"{key:>18} " + " ".join(f"{results[n][key]:>16.1f}" for n in results))
    if args.out:
        args.out.write_text(json.dumps({"machine": header, "date": date, "steps_ms": results}, indent=1))


if __name__ == "__main__":
    main()
