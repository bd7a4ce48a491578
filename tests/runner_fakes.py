"""What the cost-model and sim-runner tests share: a cost model whose sums are exact, words, a sequence,
a clock that records its waits."""

from __future__ import annotations

from microserve.engine.sampling import SamplingParams
from microserve.engine.sequence import Sequence
from microserve.runner.cost_model import CostModel

# Powers of two, so every sum below is exact in floating point.
COST = CostModel(
    step_overhead_s=1.0,
    per_token_s=0.5,
    per_attention_pair_s=0.25,
    per_kv_gather_token_s=0.125,
    per_sample_s=2.0,
    transfer_latency_s=0.5,
    transfer_bandwidth_bytes_per_s=1024.0,
    kv_bytes_per_token=256,
)
WORDS = [100, 101, 102, 103, 104, 105, 106, 107]


def make_seq(tokens: list[int], computed: int = 0, rid: str = "r", seed: int | None = None) -> Sequence:
    seq = Sequence(rid, list(tokens), SamplingParams(seed=seed))
    seq.num_computed_tokens = computed
    return seq


class FakeClock:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
