"""Structured output on this CPU: llguidance against xgrammar, beside the bundled model's decode step.

For three JSON schemas: the compile time (grammar from the schema, the matcher, and its first mask, as a
request pays it before its first token), then the per-step cost of constrained decoding at 1 and 32
sequences: every sequence's token bitmask (llguidance on its thread pool; xgrammar's batch matcher),
the bitmask applied to [rows, vocab] float32 logits (microserve's vectorised apply; xgrammar's CPU
kernel), and advancing each matcher on its token. The sequences walk a valid answer, staggered so that
they sit at different places in it. The peer is the unconstrained decode step of the bundled model
(the engine's default dtype and kernels), measured in the same run.

Usage: python benchmarks/grammar.py [--threads 2] [--steps 20] [--stat median|min] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from microserve.engine.config import CacheConfig, EngineConfig
from microserve.engine.core import EngineCore
from microserve.engine.grammar import GrammarCompiler, GrammarSpec
from microserve.engine.sampling import SamplingParams
from microserve.engine.scheduler import SchedulerConfig
from microserve.engine_builder import build_core
from microserve.machine import describe_machine
from microserve.runner.grammar_mask import BitmaskFiller, apply_bitmask

BATCHES = (1, 32)
STAT = "median"  # set by --stat
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "status": {"enum": ["pending", "shipped", "delivered"]},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "note": {"type": ["string", "null"]},
    },
    "required": ["id", "status", "items", "note"],
    "additionalProperties": False,
}
WIDE = {
    "type": "object",
    "properties": {
        f"field_{i}": [{"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}][
            i % 4
        ]
        for i in range(24)
    },
    "required": [f"field_{i}" for i in range(24)],
    "additionalProperties": False,
}
SCHEMAS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "person (2 fields)": (PERSON, {"name": "Ada Lovelace", "age": 36}),
    "order (nested, enum, pattern)": (
        ORDER,
        {
            "id": "ABC-1234",
            "status": "shipped",
            "items": [{"sku": "tea-01", "qty": 2}, {"sku": "cup-07", "qty": 1}],
            "note": "leave at the door",
        },
    ),
    "wide (24 typed fields)": (
        WIDE,
        {f"field_{i}": ["text", 7, 2.5, True][i % 4] for i in range(24)},
    ),
}


def summary(times: list[float]) -> float:
    """The median; with --stat min the least disturbed run (a shared machine's load only adds time)."""
    return min(times) if STAT == "min" else statistics.median(times)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return summary(times) * 1e3


class Llguidance:
    name = f"llguidance {importlib.metadata.version('llguidance')}"

    def __init__(self, core: EngineCore) -> None:
        self.compiler = GrammarCompiler.for_tokenizer(core.tokenizer)
        self.fill = BitmaskFiller()

    def compile_ms(self, schema: dict[str, Any], repeats: int) -> float:
        def once() -> None:
            self.compiler._compiled.clear()  # no cache: the cost of a grammar's first request
            self.fill([self.compiler.matcher(GrammarSpec.json_schema(schema))])

        return median_ms(once, repeats)

    def matchers(self, schema: dict[str, Any], n: int) -> list[Any]:
        return [self.compiler.matcher(GrammarSpec.json_schema(schema)) for _ in range(n)]

    def masks(self, matchers: list[Any]) -> np.ndarray[Any, Any]:
        return self.fill(matchers)

    def apply(self, logits: torch.Tensor, masks: np.ndarray[Any, Any]) -> None:
        apply_bitmask(logits, list(range(logits.shape[0])), masks)

    def accept(self, matcher: Any, token: int) -> None:
        assert matcher.accept(token), matcher.error


class Xgrammar:
    def __init__(self, core: EngineCore) -> None:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgr
        self.name = f"xgrammar {importlib.metadata.version('xgrammar')}"
        tok = core.tokenizer
        hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
        self.info = xgr.TokenizerInfo.from_huggingface(
            hf, vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.eos_token_ids)
        )
        self.compiler = xgr.GrammarCompiler(self.info)
        self.batch = xgr.BatchGrammarMatcher()
        self.vocab = tok.vocab_size

    def _compiled(self, schema: dict[str, Any]) -> Any:
        # The same JSON form as microserve's llguidance defaults: ", " and ": ", no free whitespace.
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def compile_ms(self, schema: dict[str, Any], repeats: int) -> float:
        def once() -> None:
            self.compiler.clear_cache()
            matcher = self.xgr.GrammarMatcher(self._compiled(schema))
            matcher.fill_next_token_bitmask(self.xgr.allocate_token_bitmask(1, self.vocab))

        return median_ms(once, repeats)

    def matchers(self, schema: dict[str, Any], n: int) -> list[Any]:
        compiled = self._compiled(schema)
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def masks(self, matchers: list[Any]) -> torch.Tensor:
        bitmask = self.xgr.allocate_token_bitmask(len(matchers), self.vocab)
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)
        return bitmask

    def apply(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, masks)

    def accept(self, matcher: Any, token: int) -> None:
        assert matcher.accept_token(token)


def step_costs(
    lib: Any, core: EngineCore, schema: dict[str, Any], doc: dict[str, Any], batch: int
) -> dict[str, float]:
    """Median per-step ms of the masks, their apply and the advance, `batch` sequences walking `doc`
    over and over (a finished one starts again), staggered so that they are at different places in it."""
    answer = [
        *core.tokenizer.encode(json.dumps(doc), add_special_tokens=False),
        min(core.tokenizer.eos_token_ids),
    ]
    matchers = lib.matchers(schema, batch)
    positions = [i * 7 % len(answer) for i in range(batch)]
    for matcher, position in zip(matchers, positions, strict=True):
        for token in answer[:position]:
            lib.accept(matcher, token)
    logits = torch.randn(batch, core.tokenizer.vocab_size)
    fill, apply, accept = [], [], []
    for _ in range(len(answer)):
        start = time.perf_counter()
        masks = lib.masks(matchers)
        fill.append(time.perf_counter() - start)
        rows = logits.clone()
        start = time.perf_counter()
        lib.apply(rows, masks)
        apply.append(time.perf_counter() - start)
        start = time.perf_counter()
        for matcher, position in zip(matchers, positions, strict=True):
            lib.accept(matcher, answer[position])
        accept.append(time.perf_counter() - start)
        positions = [p + 1 for p in positions]
        for i, position in enumerate(positions):
            if position == len(answer):  # untimed: a fresh matcher, as a new request would have
                matchers[i], positions[i] = lib.matchers(schema, 1)[0], 0
    med = {k: summary(v) * 1e3 for k, v in (("mask", fill), ("apply", apply), ("advance", accept))}
    med["total"] = med["mask"] + med["apply"] + med["advance"]
    return med


def decode_step_ms(core: EngineCore, batch: int, steps: int) -> float:
    """Median unconstrained decode step of `batch` greedy sequences after 64-token prompts."""
    rng = random.Random(batch)
    params = SamplingParams(max_tokens=512, temperature=0.0, ignore_eos=True)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid in ids:
        core.add_request(rid, [rng.randrange(100, 49000) for _ in range(64)], params)
    while core.num_waiting or any(s.num_computed_tokens < 64 for s in core.scheduler.running):
        core.step()
    core.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - start)
    for rid in ids:
        core.abort_request(rid)
    return summary(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stat", choices=["median", "min"], default="median")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    global STAT
    STAT = args.stat
    core = build_core(
        EngineConfig(
            threads=args.threads,
            max_model_len=1024,
            cache=CacheConfig(memory_bytes=1 << 29, enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048),
        )
    )
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    header = f"{describe_machine()}; torch {torch.__version__}; {args.threads} threads; {args.stat}; {date}"
    print(header)
    results: dict[str, Any] = {"machine": header, "libraries": {}}
    for lib in (Llguidance(core), Xgrammar(core)):
        rows: dict[str, Any] = {}
        for name, (schema, doc) in SCHEMAS.items():
            row: dict[str, Any] = {"compile_ms": lib.compile_ms(schema, args.repeats)}
            for b in BATCHES:
                row[f"b={b}"] = step_costs(lib, core, schema, doc, b)
            rows[name] = row
            print(f"{lib.name:18} {name:30} {json.dumps(row)}", flush=True)
        results["libraries"][lib.name] = rows
    # The peer, after the libraries (on a shared machine the load drifts: the closer in time the better).
    decode = {b: decode_step_ms(core, b, args.steps) for b in BATCHES}
    results["decode_step_ms"] = decode
    print("unconstrained decode step: " + ", ".join(f"b={b} {ms:.1f} ms" for b, ms in decode.items()))
    print(
        "| library | schema | compile ms | " + " | ".join(f"b={b} step ms (share of decode)" for b in BATCHES)
    )
    for lib_name, rows in results["libraries"].items():
        for name, row in rows.items():
            cells = [
                f"{row[f'b={b}']['total']:.3f} ({row[f'b={b}']['total'] / decode[b]:.1%})" for b in BATCHES
            ]
            print(f"| {lib_name} | {name} | {row['compile_ms']:.2f} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
