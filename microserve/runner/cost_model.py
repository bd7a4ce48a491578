"""The modelled wall time of one engine step and of one KV transfer, as pure functions of their size.

The sim runner sleeps for these times, the simulator advances a virtual clock by them, `profile.py` fits them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson

from microserve.engine.scheduler import ScheduledBatch

FORMAT = "microserve-cost-model"
VERSION = 1


def attention_pairs(num_computed: int, num_new: int) -> int:
    """(query, key) pairs of causal attention for `num_new` tokens after `num_computed` cached ones.

    Query i (0-based among the new tokens) attends to num_computed + i + 1 keys; summed, that is
    n * (start + (n + 1) / 2), which is an integer because n * (n + 1) is even.
    """
    return num_new * num_computed + num_new * (num_new + 1) // 2


def step_features(
    batch_items: Iterable[tuple[int, int]], num_sampling: int | None = None
) -> tuple[int, int, int, int, int]:
    """What a step's time is linear in: (1, new tokens, attention pairs, KV tokens gathered, samplers).

    `batch_items` are (num_computed_before, num_new_tokens) per sequence. `num_sampling` counts the
    sequences that sample a token this step; None means all of them (a pure decode step). The profiler
    fits against these same features, so the fit and the prediction cannot drift apart. An empty step
    has all-zero features, the constant included: the engine does not run empty steps.

    KV gathering follows the torch runner: decodes (one new token) attend as one batch padded to the
    longest decode context, so each reads that many slots; a chunk on a cached prefix reads its whole
    context; a chunk from position 0 reads nothing (it attends to its own fresh K/V). Were the runner
    to read only each decode's own context, the decode term would become a plain sum.
    """
    num_seqs = tokens = pairs = gathered = num_decodes = longest_decode = 0
    for computed, new in batch_items:
        if computed < 0 or new < 1:
            raise ValueError(f"a batch item needs computed >= 0 and new >= 1, got ({computed}, {new})")
        num_seqs += 1
        tokens += new
        pairs += attention_pairs(computed, new)
        if new == 1:
            num_decodes += 1
            longest_decode = max(longest_decode, computed + 1)
        elif computed:
            gathered += computed + new
    gathered += num_decodes * longest_decode
    sampling = num_seqs if num_sampling is None else num_sampling
    if not 0 <= sampling <= num_seqs:
        raise ValueError(f"num_sampling must be in [0, {num_seqs}], got {sampling}")
    return (1 if num_seqs else 0), tokens, pairs, gathered, sampling


@dataclass(slots=True, frozen=True)
class CostModel:
    """Step time = constant + per token + per attention pair + per KV token gathered + per sampler.

    The gather term is there because measurement said so: on CPU a decode step's attention is
    dominated by gathering each sequence's cached K/V from the paged storage (linear in its context,
    once per step), while a long prefill's cost grows with its (query, key) pairs; one attention term
    cannot fit both. On the default profile the fit error is 17% mean / 70% worst without the term,
    12% / 48% with it counted per sequence, 11% / 28% counted padded as `step_features` does.
    KV transfer time = latency + bytes / bandwidth; `kv_bytes_per_token` is the profiled model's KV
    size, so the sim engine can model moving the real model's KV while it stores 8 bytes a token.
    """

    step_overhead_s: float
    per_token_s: float
    per_attention_pair_s: float
    per_kv_gather_token_s: float
    per_sample_s: float
    transfer_latency_s: float = 0.0
    transfer_bandwidth_bytes_per_s: float = 1e9
    kv_bytes_per_token: int = 0
    # Where the figures came from (model, machine, date, raw measurements, fit error); not compared.
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "metadata" and not value >= 0:
                raise ValueError(f"{f.name} must be non-negative, got {value}")
        if not self.transfer_bandwidth_bytes_per_s > 0:
            raise ValueError(
                f"transfer_bandwidth_bytes_per_s must be positive, got {self.transfer_bandwidth_bytes_per_s}"
            )

    @property
    def coefficients(self) -> tuple[float, float, float, float, float]:
        """The step coefficients in the order of `step_features`."""
        return (
            self.step_overhead_s,
            self.per_token_s,
            self.per_attention_pair_s,
            self.per_kv_gather_token_s,
            self.per_sample_s,
        )

    def step_time(self, batch_items: Iterable[tuple[int, int]], num_sampling: int | None = None) -> float:
        """Seconds for one step over (num_computed_before, num_new_tokens) items; see `step_features`."""
        features = step_features(batch_items, num_sampling)
        return sum(c * x for c, x in zip(self.coefficients, features, strict=True))

    def step_time_for(self, batch: ScheduledBatch) -> float:
        """Seconds for a scheduled batch; `Sequence.samples_after` says which sequences sample."""
        pairs = list(zip(batch.seqs, batch.num_new_tokens, strict=True))
        sampling = sum(seq.samples_after(n) for seq, n in pairs)
        return self.step_time([(seq.num_computed_tokens, n) for seq, n in pairs], sampling)

    def transfer_time(self, num_bytes: int) -> float:
        """Seconds to move `num_bytes` of KV from one engine to another."""
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be non-negative, got {num_bytes}")
        return self.transfer_latency_s + num_bytes / self.transfer_bandwidth_bytes_per_s

    def kv_transfer_time(self, num_tokens: int) -> float:
        """Seconds to move the profiled model's KV of `num_tokens` tokens."""
        return self.transfer_time(num_tokens * self.kv_bytes_per_token)

    # -- persistence ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        coefficients = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "metadata"}
        return {"format": FORMAT, "version": VERSION, "coefficients": coefficients, "metadata": self.metadata}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} version {VERSION} document")
        coefficients = d.get("coefficients", {})
        names = [f.name for f in fields(cls) if f.name != "metadata"]
        unknown = sorted(set(coefficients) - set(names))
        if unknown:
            raise ValueError(f"unknown cost model coefficients: {', '.join(unknown)}")
        try:
            values: dict[str, Any] = {
                k: int(v) if k == "kv_bytes_per_token" else float(v) for k, v in coefficients.items()
            }
            return cls(**values, metadata=dict(d.get("metadata", {})))
        except TypeError as exc:  # a required coefficient is missing
            raise ValueError(f"cost model is incomplete: {exc}") from None

    def to_json(self, path: str | Path | None = None) -> bytes:
        """The model as indented JSON; also written to `path` when one is given."""
        data = orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(data)
        return data

    @classmethod
    def from_json(cls, path: str | Path) -> CostModel:
        try:
            return cls.from_dict(orjson.loads(Path(path).read_bytes()))
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def default(cls) -> CostModel:
        """SmolLM2-135M-Instruct, float32, 2 torch threads, on a 2-vCPU "Intel(R) Xeon(R) Processor" VM.

        Fitted by `microserve engine profile --dtype float32 --threads 2` on 2026-11-22 in 28 s (torch
        2.13.0+cpu, block size 16, temperature 1.0); the run is docs/profiles/smollm2-135m-fp32-2threads.json.
        In round figures: 28 ms per step, 0.93 ms per token, 0.13 us per attention pair, 10 us per KV
        token gathered, 1.6 ms per sampled sequence; so a decode step of one sequence at context 64
        takes 31 ms and a 1024-token prefill 1.04 s. Relative fit error over 31 points: 11% mean, 28%
        worst (the largest decode batches, whose KV gather outgrows the CPU caches, and a decode batch
        of unequal contexts). KV: 46080 bytes a token, moved (in-process export and import) at
        1.9 GB/s with no measurable latency.
        """
        return cls(
            step_overhead_s=0.027544867406661608,
            per_token_s=0.0009259655155050694,
            per_attention_pair_s=1.2825796615397226e-07,
            per_kv_gather_token_s=1.0319360516968215e-05,
            per_sample_s=0.001594146197020825,
            transfer_latency_s=0.0,
            transfer_bandwidth_bytes_per_s=1914910819.64978,
            kv_bytes_per_token=46080,
            metadata={"source": "docs/profiles/smollm2-135m-fp32-2threads.json", "date": "2026-11-22"},
        )
