"""Calibrate a CostModel by timing the real TorchRunner on synthetic batches and fitting the coefficients.

Run it as `microserve engine profile --dtype float32 --threads 2 --out docs/profiles/NAME.json`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from microserve.engine.config import resolve_dtype
from microserve.engine.kv_cache import KVCacheManager
from microserve.engine.kv_storage import KVStorage
from microserve.engine.sampling import SamplingParams
from microserve.engine.scheduler import ScheduledBatch
from microserve.engine.sequence import Sequence as Seq
from microserve.machine import describe_machine
from microserve.runner.cost_model import CostModel, step_features
from microserve.runner.torch_runner import TorchRunner

# (num_computed_before, num_new_tokens, samples): one sequence's share of a profiled step.
Item = tuple[int, int, bool]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(slots=True, frozen=True)
class ProfileGrid:
    """The batches to time. Points span the features so that each coefficient is identifiable."""

    prefill_lengths: tuple[int, ...] = (16, 64, 256, 512, 1024)
    # Chunks on top of a cached prefix; the ones that do not sample separate per-token from per-sample.
    prefix_chunks: tuple[Item, ...] = (
        (256, 256, True),
        (512, 512, True),
        (768, 256, False),
        (256, 64, False),
    )
    decode_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    decode_contexts: tuple[int, ...] = (64, 256, 1024)
    max_decode_kv_tokens: int = 16384  # skips the largest decode points to bound memory and time
    # Steps as the scheduler makes them: a prefill chunk riding along with decodes.
    mixed: tuple[tuple[Item, ...], ...] = (
        ((0, 128, True), *[(256, 1, True)] * 8),
        ((512, 64, False), *[(128, 1, True)] * 32),
        tuple((64 * (i + 1), 1, True) for i in range(16)),  # decodes of unequal contexts
    )
    transfer_tokens: tuple[int, ...] = (16, 128, 512, 1024)
    warmup: int = 1
    repeats: int = 3
    min_point_s: float = 0.3  # cheap points repeat until they have run this long (at most max_repeats)
    max_repeats: int = 15
    patience_s: float = 4.0  # per point, for runs that other processes did not disturb; see _measure

    @classmethod
    def quick(cls) -> ProfileGrid:
        """A few points only, for tests: seconds, not a minute."""
        return cls(
            prefill_lengths=(16, 64, 256),
            prefix_chunks=((128, 128, True), (256, 64, False)),
            decode_batch_sizes=(1, 4, 8),
            decode_contexts=(64, 512),
            mixed=(),
            transfer_tokens=(16, 256),
            repeats=2,
            min_point_s=0.05,
            max_repeats=4,
            patience_s=1.0,
        )

    def points(self) -> list[tuple[str, tuple[Item, ...]]]:
        out: list[tuple[str, tuple[Item, ...]]] = [
            (f"prefill {n}", ((0, n, True),)) for n in self.prefill_lengths
        ]
        for computed, new, samples in self.prefix_chunks:
            label = f"chunk {new} on {computed}" + ("" if samples else " (no sample)")
            out.append((label, ((computed, new, samples),)))
        for b, ctx in itertools.product(self.decode_batch_sizes, self.decode_contexts):
            if b * ctx <= self.max_decode_kv_tokens:
                out.append((f"decode {b} x {ctx}", ((ctx, 1, True),) * b))
        out += [(f"mixed {i}", items) for i, items in enumerate(self.mixed)]
        return out

    def blocks_needed(self, block_size: int) -> int:
        """KV blocks the largest point holds at once (plus one spare block per sequence)."""
        need = [sum(-(-(c + n) // block_size) + 1 for c, n, _ in items) for _, items in self.points()]
        need += [2 * (-(-(n + 1) // block_size)) for n in self.transfer_tokens]
        return max(need)


@dataclass(slots=True, frozen=True)
class Timing:
    median_s: float
    runs: int  # clean runs the median is over
    discarded: int  # runs thrown away because other processes took CPU meanwhile


def profile(
    runner: TorchRunner,
    kv: KVCacheManager,
    grid: ProfileGrid | None = None,
    *,
    model_name: str = "",
    log: Callable[[str], None] | None = None,
) -> CostModel:
    """Time every point of `grid` on `runner` (bound to `kv`'s storage) and fit a CostModel to it.

    Leaves `kv` as it found it in capacity: every block allocated here is freed (the full ones stay
    in the prefix cache as evictable blocks, like any finished request's).
    """
    grid = grid or ProfileGrid()
    if kv.storage is None or runner.storage is not kv.storage:
        raise ValueError("profile needs a KV cache with storage, and the runner bound to that storage")
    if kv.num_free_blocks < grid.blocks_needed(kv.block_size):
        raise ValueError(
            f"profiling this grid needs {grid.blocks_needed(kv.block_size)} free KV blocks, "
            f"the cache has {kv.num_free_blocks}"
        )
    say = log or (lambda _msg: None)
    rng = random.Random(0)
    vocab = runner.model.config.vocab_size
    started = time.perf_counter()

    rows: list[dict[str, Any]] = []
    for label, items in grid.points():
        timing = _time_point(runner, kv, items, grid, rng, vocab)
        rows.append({"label": label, "items": [list(it) for it in items], **_timing_fields(timing)})
        say(f"{label:>28}: {timing.median_s * 1e3:9.2f} ms  ({timing.runs} runs, {timing.discarded} dropped)")
    features = np.array([_features(r["items"]) for r in rows], dtype=np.float64)
    measured = np.array([r["median_s"] for r in rows])
    # A point with no undisturbed run would drag the fit (other processes can slow a step 10x);
    # leave such points out while enough clean ones remain to pin every coefficient.
    in_fit = np.array([r["runs"] > 0 for r in rows])
    if in_fit.sum() < features.shape[1] + 2:
        in_fit[:] = True
    coef = nnls_relative(features[in_fit], measured[in_fit])
    errors = _record_fit(rows, features @ coef, measured, in_fit)

    transfer_rows: list[dict[str, Any]] = []
    for n in grid.transfer_tokens:
        size, timing = _time_transfer(kv, n, grid, rng, vocab)
        transfer_rows.append({"tokens": n, "bytes": size, **_timing_fields(timing)})
        say(f"{f'transfer {n} tokens':>28}: {timing.median_s * 1e3:9.2f} ms  ({size} bytes)")
    sizes = np.array([[1.0, r["bytes"]] for r in transfer_rows])
    measured = np.array([r["median_s"] for r in transfer_rows])
    # Absolute error here: the large transfers (whole prompts) are the ones whose time matters.
    latency, per_byte = nnls(sizes, measured)
    _record_fit(transfer_rows, sizes @ np.array([latency, per_byte]), measured, np.ones(len(sizes), bool))

    metadata = {
        "model": model_name,
        "dtype": runner.layout.dtype,
        "quantization": runner.quantization,
        "device": str(runner.device),
        "threads": torch.get_num_threads(),
        "machine": describe_machine(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "block_size": kv.block_size,
        "sampling": f"temperature {SamplingParams().temperature} (the API default)",
        "transfer": "in-process export + parse + import of the real KV layout; a network adds to it",
        "fit_error": errors,
        "measurements": rows,
        "transfer_measurements": transfer_rows,
        "profile_wall_s": round(time.perf_counter() - started, 1),
    }
    overhead, per_token, per_pair, per_gather, per_sample = (float(c) for c in coef)  # step_features' order
    return CostModel(
        step_overhead_s=overhead,
        per_token_s=per_token,
        per_attention_pair_s=per_pair,
        per_kv_gather_token_s=per_gather,
        per_sample_s=per_sample,
        transfer_latency_s=float(latency),
        # A zero slope (possible only on a degenerate grid) would mean infinitely fast transfers.
        transfer_bandwidth_bytes_per_s=1.0 / float(per_byte) if per_byte > 0 else 1e12,
        kv_bytes_per_token=runner.layout.bytes_per_token,
        metadata=metadata,
    )


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The non-negative x minimising |a @ x - b|, for a handful of columns.

    Solved exactly by brute force: the optimum is the unconstrained least-squares fit on its own
    support (the KKT conditions), so the best non-negative fit over all 2^k supports is it. Simpler to
    trust than a port of Lawson-Hanson, and with k = 5 it is 31 tiny solves.
    """
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0  # a feature that never occurs: its coefficient stays 0
    scaled = a / scale  # unit columns keep lstsq well conditioned (the features differ by 1e6)
    best, best_residual = np.zeros(a.shape[1]), float(np.sum(b**2))
    for support in itertools.product((False, True), repeat=a.shape[1]):
        cols = np.flatnonzero(support)
        if cols.size == 0:
            continue
        x, *_ = np.linalg.lstsq(scaled[:, cols], b, rcond=None)
        residual = float(np.sum((scaled[:, cols] @ x - b) ** 2))
        if np.all(x >= 0) and residual < best_residual:
            best = np.zeros(a.shape[1])
            best[cols] = x
            best_residual = residual
    return best / scale


def nnls_relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative x minimising the relative error of a @ x against b (all b > 0).

    Step times span two orders of magnitude, so plain least squares would fit the long prefills and
    ignore the decode steps; dividing each row by its b fits relative error instead.
    """
    return nnls(a / b[:, None], np.ones_like(b))


def _features(items: Sequence[Sequence[Any]]) -> tuple[int, ...]:
    return step_features(((c, n) for c, n, _ in items), sum(bool(s) for _, _, s in items))


def _timing_fields(t: Timing) -> dict[str, Any]:
    return {"median_s": t.median_s, "runs": t.runs, "discarded": t.discarded}


def _record_fit(
    rows: list[dict[str, Any]], predicted: np.ndarray, measured: np.ndarray, in_fit: np.ndarray
) -> dict[str, float]:
    """Each row's prediction and relative error; the summary is over the rows the fit used."""
    rel = (predicted - measured) / measured
    for row, p, e, used in zip(rows, predicted, rel, in_fit, strict=True):
        row.update(predicted_s=float(p), rel_error=round(float(e), 4), in_fit=bool(used))
    return {
        "mean_abs_rel": round(float(np.mean(np.abs(rel[in_fit]))), 4),
        "max_abs_rel": round(float(np.max(np.abs(rel[in_fit]))), 4),
        "points_left_out": int(np.sum(~in_fit)),
    }


def _make_seq(
    kv: KVCacheManager, computed: int, new: int, samples: bool, rng: random.Random, vocab: int
) -> Seq:
    """A sequence whose first `computed` tokens count as already in the cache (their KV is whatever the
    blocks hold: timing does not depend on it) and whose next `new` tokens are to be computed."""
    total = computed + new + (0 if samples else 1)  # one token more: the chunk does not reach the end
    seq = Seq(
        f"profile-{rng.getrandbits(64):x}", [rng.randrange(vocab) for _ in range(total)], SamplingParams()
    )
    if not kv.allocate(seq, computed + new):
        raise RuntimeError("the KV cache ran out of blocks while profiling")
    kv.append(seq, computed)
    return seq


def _time_point(
    runner: TorchRunner,
    kv: KVCacheManager,
    items: tuple[Item, ...],
    grid: ProfileGrid,
    rng: random.Random,
    vocab: int,
) -> Timing:
    batch = ScheduledBatch()
    try:
        for computed, new, samples in items:
            batch.add(_make_seq(kv, computed, new, samples, rng, vocab), new)
        # Nothing is committed between runs, so each run recomputes exactly the same step.
        return _measure(lambda: runner.execute(batch), grid)
    finally:
        for seq in batch.seqs:
            kv.free(seq)
            runner.forget(seq.request_id)


def _time_transfer(
    kv: KVCacheManager, num_tokens: int, grid: ProfileGrid, rng: random.Random, vocab: int
) -> tuple[int, Timing]:
    """Payload bytes, and the time to export `num_tokens` of KV and import them into other blocks."""
    src = _make_seq(kv, num_tokens, 1, True, rng, vocab)
    dst = Seq("profile-dst", list(src.token_ids), SamplingParams())
    try:
        if not kv.allocate(dst, num_tokens):
            raise RuntimeError("the KV cache ran out of blocks while profiling")
        size = len(kv.export_kv(src, 0, num_tokens))
        return size, _measure(lambda: kv.import_kv(dst, kv.export_kv(src, 0, num_tokens)), grid)
    finally:
        kv.free(src)
        kv.free(dst)


def _measure(fn: Callable[[], object], grid: ProfileGrid) -> Timing:
    """Median wall time of clean runs of `fn`, after warm-up.

    On a shared machine another process's burst slows torch's thread pool many-fold (its threads wait
    at barriers for a descheduled peer), and such bursts last seconds, so a median alone does not
    reject them. A run during which other processes used CPU is discarded instead. After `patience_s`
    the point settles for the clean runs it has; with none it waits up to three times as long for one,
    then takes the fastest run of all (the least disturbed) and says so through `runs == 0`; the fit
    leaves such points out.
    """
    for _ in range(grid.warmup):
        fn()
    clean: list[float] = []
    dirty: list[float] = []
    start = time.perf_counter()
    while len(clean) < grid.max_repeats:
        spent = time.perf_counter() - start
        if len(clean) >= grid.repeats and sum(clean) >= grid.min_point_s:
            break
        if (clean and spent > grid.patience_s) or spent > 3 * grid.patience_s:
            break
        others0, own0, t0 = _system_busy_s(), time.process_time(), time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        others = _system_busy_s() - others0 - (time.process_time() - own0)
        # /proc/stat counts in ticks (10 ms) per CPU, hence the absolute slack.
        (dirty if others > 0.02 + 0.05 * wall else clean).append(wall)
    if not clean:
        return Timing(min(dirty), 0, len(dirty))
    return Timing(statistics.median(clean), len(clean), len(dirty))


def _system_busy_s() -> float:
    """CPU seconds all processes have used (steal included: a busy hypervisor also slows us)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0  # not Linux: no contention detection
    user, nice, system, _idle, _iowait, irq, softirq, steal = (ticks + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def profile_model(
    model: str = "smollm2-135m",
    *,
    dtype: str = "float32",
    device: str = "cpu",
    quantization: str = "none",
    threads: int | None = None,
    block_size: int = 16,
    grid: ProfileGrid | None = None,
    log: Callable[[str], None] | None = None,
) -> CostModel:
    """Load `model`, build a TorchRunner and a KV cache just big enough for `grid`, and profile it."""
    from microserve.model.loader import load_model, resolve_model, resolve_quantization

    if threads:
        torch.set_num_threads(threads)
    grid = grid or ProfileGrid()
    path = resolve_model(model)
    config, weights, quantized = load_model(path, resolve_quantization(quantization, path, device, dtype))
    runner = TorchRunner(
        config,
        weights,
        dtype=dtype,
        device=device,
        block_size=block_size,
        eos_token_ids=frozenset(),
        quantized=quantized,
    )
    num_blocks = grid.blocks_needed(block_size)
    storage = KVStorage(runner.layout, num_blocks, device)
    runner.bind(storage)
    kv = KVCacheManager(num_blocks, block_size, storage)
    return profile(runner, kv, grid, model_name=model, log=log)


def run_profile_command(args: argparse.Namespace) -> int:
    """`microserve engine profile`: measure this machine and write the sim backend's cost model."""
    grid = ProfileGrid.quick() if args.quick else ProfileGrid()
    from microserve.machine import resolve_device

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cost = profile_model(
        args.model,
        dtype=dtype,
        device=device,
        quantization=args.quantization,
        threads=args.threads,
        block_size=args.block_size,
        grid=grid,
        log=print,
    )
    cost.to_json(args.out)
    for name, value in cost.to_dict()["coefficients"].items():
        print(f"{name:>30} = {value:.4g}")
    print(f"fit error: {cost.metadata['fit_error']}; wrote {args.out}")
    return 0
