"""The cost model's arithmetic, the sim runner's clock and tokens, and the profiler's fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from microserve.engine.kv_cache import KVCacheManager
from microserve.engine.kv_storage import KVStorage
from microserve.engine.sampling import SamplingParams
from microserve.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from microserve.engine.sequence import Sequence
from microserve.runner.cost_model import CostModel, attention_pairs, step_features
from microserve.runner.profile import ProfileGrid, nnls_relative
from microserve.runner.sim_runner import SimRunner, plain_word_tokens

REPO = Path(__file__).resolve().parents[1]
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


# -- cost model ------------------------------------------------------------------------------------


def test_attention_pairs_counts_causal_query_key_pairs():
    for computed in (0, 1, 7, 64):
        for new in (1, 2, 5, 16):
            assert attention_pairs(computed, new) == sum(computed + i + 1 for i in range(new))


def test_step_time_is_the_exact_sum_of_its_terms():
    items = [(0, 4), (10, 1), (3, 2)]
    # tokens 7; pairs 10 + 11 + 9 = 30; gathered: none for the fresh chunk, 11 for the decode, 3 + 2
    assert step_features(items, 2) == (1, 7, 30, 16, 2)
    assert COST.step_time(items, num_sampling=2) == 1.0 + 7 * 0.5 + 30 * 0.25 + 16 * 0.125 + 2 * 2.0
    assert COST.step_time(items) == 18.0 + 2.0  # None: every sequence samples
    assert COST.step_time([]) == 0.0


def test_decodes_gather_kv_padded_to_the_longest_decode_context():
    assert step_features([(3, 1), (9, 1)])[3] == 2 * 10
    assert step_features([(3, 1), (9, 1), (100, 8)])[3] == 2 * 10 + 108


def test_step_time_for_samples_only_sequences_that_reach_their_end():
    batch = ScheduledBatch()
    batch.add(make_seq(list(range(10))), 4)  # a prefill chunk: 4 of 10 tokens, no sample
    batch.add(make_seq(list(range(11)), computed=10), 1)  # a decode step: samples
    assert COST.step_time_for(batch) == COST.step_time([(0, 4), (10, 1)], num_sampling=1)
    assert COST.step_time_for(batch) == 1.0 + 5 * 0.5 + (10 + 11) * 0.25 + 11 * 0.125 + 2.0


def test_step_features_reject_impossible_items():
    with pytest.raises(ValueError, match="new >= 1"):
        step_features([(0, 0)])
    with pytest.raises(ValueError, match="num_sampling"):
        step_features([(0, 3)], num_sampling=2)


def test_transfer_time_is_latency_plus_bytes_over_bandwidth():
    assert COST.transfer_time(0) == 0.5
    assert COST.transfer_time(2048) == 2.5
    assert COST.kv_transfer_time(8) == 2.5  # 8 tokens of 256 bytes
    assert SimRunner(COST, WORDS).transfer_time(8) == 2.5
    with pytest.raises(ValueError):
        COST.transfer_time(-1)


def test_a_prefill_for_another_engine_never_samples():
    seq = make_seq(list(range(10)), computed=6)
    seq.prefill_only = True
    batch = ScheduledBatch()
    batch.add(seq, 4)
    assert COST.step_time_for(batch) == COST.step_time([(6, 4)], num_sampling=0)
    assert SimRunner(COST, WORDS, clock=FakeClock()).execute(batch) == [None]


def test_cost_model_rejects_negative_coefficients():
    with pytest.raises(ValueError, match="per_token_s"):
        CostModel(0.0, -1.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="bandwidth"):
        CostModel(0.0, 0.0, 0.0, 0.0, 0.0, transfer_bandwidth_bytes_per_s=0.0)


def test_cost_model_json_round_trip(tmp_path: Path):
    model = CostModel(
        0.025, 4.1e-4, 3.1e-6, 1.5e-5, 2e-3, 1e-4, 1.2e9, 46080, metadata={"model": "m", "fit": [1, 2]}
    )
    path = tmp_path / "sub" / "cost.json"
    data = model.to_json(path)
    assert path.read_bytes() == data
    loaded = CostModel.from_json(path)
    assert loaded == model
    assert loaded.coefficients == model.coefficients
    assert loaded.metadata == {"model": "m", "fit": [1, 2]}
    assert isinstance(loaded.kv_bytes_per_token, int)


def test_cost_model_from_json_says_what_is_wrong(tmp_path: Path):
    path = tmp_path / "cost.json"
    path.write_bytes(b"{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CostModel.from_json(path)
    path.write_bytes(b'{"format": "other"}')
    with pytest.raises(ValueError, match="microserve-cost-model"):
        CostModel.from_json(path)
    doc = COST.to_dict()
    doc["coefficients"]["x"] = 1.0
    path.write_bytes(orjson.dumps(doc))
    with pytest.raises(ValueError, match="unknown cost model coefficients: x"):
        CostModel.from_json(path)
    del doc["coefficients"]["x"], doc["coefficients"]["per_sample_s"]
    path.write_bytes(orjson.dumps(doc))
    with pytest.raises(ValueError, match="incomplete"):
        CostModel.from_json(path)


def test_default_matches_the_saved_profile():
    saved = CostModel.from_json(REPO / "docs/profiles/smollm2-135m-fp32-2threads.json")
    assert CostModel.default() == saved
    assert saved.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4  # K and V, 30 layers, 3 KV heads of 64 floats
    assert saved.metadata["fit_error"]["mean_abs_rel"] < 0.3
    # A lone decode step of SmolLM2-135M on 2 CPU threads takes tens of milliseconds.
    assert 0.005 < CostModel.default().step_time([(64, 1)]) < 0.2


# -- sim runner ------------------------------------------------------------------------------------


def test_execute_waits_for_the_modelled_time_through_the_clock():
    clock = FakeClock()
    runner = SimRunner(COST, WORDS, clock=clock)
    for n in (4, 6):
        batch = ScheduledBatch()
        batch.add(make_seq(list(range(10)), computed=10 - n), n)
        runner.execute(batch)
    assert clock.waits == [COST.step_time([(6, 4)]), COST.step_time([(4, 6)])]
    assert runner.modelled_time_s == sum(clock.waits)


def test_execute_returns_none_for_chunks_that_do_not_reach_the_end():
    runner = SimRunner(COST, WORDS, clock=FakeClock())
    batch = ScheduledBatch()
    batch.add(make_seq(list(range(10))), 4)
    batch.add(make_seq(list(range(10)), computed=4), 6)
    out = runner.execute(batch)
    assert out[0] is None
    assert out[1] in WORDS


def test_tokens_depend_on_content_not_on_batch_or_runner():
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [5, 5, 5, 5, 5, 5]]
    alone = []
    for i, p in enumerate(prompts):
        batch = ScheduledBatch()
        batch.add(make_seq(p, rid=f"a{i}"), len(p))
        alone += SimRunner(COST, WORDS, clock=FakeClock()).execute(batch)
    together = ScheduledBatch()
    for i, p in reversed(list(enumerate(prompts))):
        seq = make_seq(p, computed=len(p) - 1, rid=f"b{i}")  # the same content reached as a decode step
        together.add(seq, 1)
    assert SimRunner(COST, WORDS, clock=FakeClock()).execute(together) == alone[::-1]


def test_seeds_change_the_tokens():
    seqs = [make_seq([i, i + 1, i + 2]) for i in range(20)]

    def tokens(runner_seed: int = 0, request_seed: int | None = None) -> list[int]:
        runner = SimRunner(COST, WORDS, seed=runner_seed)
        return [runner.token_for(make_seq(s.token_ids, seed=request_seed)) for s in seqs]

    assert tokens() == tokens()
    assert tokens(runner_seed=1) != tokens()
    assert tokens(request_seed=7) != tokens()


def test_sim_runner_drives_the_real_scheduler_and_chunking_does_not_change_the_output():
    def generate(budget: int) -> dict[str, list[int]]:
        runner = SimRunner(COST, WORDS, clock=FakeClock(), block_size=4)
        kv = KVCacheManager(num_blocks=64, block_size=4)
        runner.bind(KVStorage(SimRunner.storage_layout(4), 64))
        sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget), kv)
        seqs = [make_seq(list(range(i, i + 13)), rid=f"r{i}") for i in range(3)]
        for seq in seqs:
            sched.add(seq)
        while sched.has_work():
            batch = sched.schedule()
            for seq, n, token in zip(batch.seqs, batch.num_new_tokens, runner.execute(batch), strict=True):
                kv.append(seq, n)
                if token is not None:
                    seq.token_ids.append(token)
                    if seq.num_completion_tokens == 5:
                        sched.finish(seq, seq.status.FINISHED_LENGTH)
        assert kv.num_free_blocks == kv.num_blocks
        return {s.request_id: s.completion_token_ids for s in seqs}

    assert generate(budget=5) == generate(budget=512)


def test_storage_layout_is_tiny_and_bind_adopts_the_storage():
    layout = SimRunner.storage_layout(32)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size) == (1, 1, 1, 32)
    assert layout.bytes_per_token == 8
    runner = SimRunner(COST, WORDS)
    assert runner.layout == SimRunner.storage_layout(16)
    storage = KVStorage(layout, 4)
    runner.bind(storage)
    assert runner.storage is storage and runner.layout == layout


def test_sim_runner_needs_words():
    with pytest.raises(ValueError):
        SimRunner(COST, [])


class FakeTokenizer:
    texts = [" the", "<s>", " a", " Hello", "ing", " x9", " toolongword", " café", " the", " World", "  ab"]

    @property
    def vocab_size(self) -> int:
        return len(self.texts)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.texts[i] for i in ids)


def test_plain_word_tokens_keeps_a_space_and_two_to_eight_ascii_letters():
    assert plain_word_tokens(FakeTokenizer()) == [0, 3, 9]  # id 8 repeats " the"
    assert plain_word_tokens(FakeTokenizer(), limit=2) == [0, 3]


def test_plain_word_tokens_fails_without_words():
    class Empty(FakeTokenizer):
        texts = ["<s>", "x"]

    with pytest.raises(ValueError, match="plain word"):
        plain_word_tokens(Empty())


# -- the profiler's fit ----------------------------------------------------------------------------


def test_nnls_recovers_exact_non_negative_coefficients():
    rng = np.random.default_rng(0)
    a = np.column_stack([np.ones(12), rng.uniform(1, 1000, 12), rng.uniform(0, 1e6, 12)])
    truth = np.array([0.02, 5e-4, 3e-7])
    assert np.allclose(nnls_relative(a, a @ truth), truth, rtol=1e-9)


def test_nnls_clamps_a_coefficient_that_least_squares_would_make_negative():
    a = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    b = np.array([3.0, 2.0, 1.0])  # falls with x: the best slope is negative, so it must be 0
    x = nnls_relative(a, b)
    assert x[1] == 0.0 and x[0] > 0
    # With the slope pinned at 0 the constant minimises sum((c/b - 1)^2): c = sum(1/b) / sum(1/b^2).
    assert x[0] == pytest.approx((1 / 3 + 1 / 2 + 1) / (1 / 9 + 1 / 4 + 1))


def test_profile_grid_points_and_block_budget():
    grid = ProfileGrid(
        prefill_lengths=(16,),
        prefix_chunks=((32, 16, False),),
        decode_batch_sizes=(2, 4),
        decode_contexts=(64, 128),
        max_decode_kv_tokens=256,
        mixed=(),
        transfer_tokens=(16,),
    )
    labels = [label for label, _ in grid.points()]
    assert labels == [
        "prefill 16",
        "chunk 16 on 32 (no sample)",
        "decode 2 x 64",
        "decode 2 x 128",
        "decode 4 x 64",
    ]
    # decode 4 x 64: four sequences of 65 tokens, 5 blocks each plus one spare.
    assert grid.blocks_needed(16) == 24


@pytest.mark.slow
def test_profile_fits_the_real_model_and_frees_its_blocks():
    from microserve.model.loader import load_weights, resolve_model
    from microserve.runner.profile import profile
    from microserve.runner.torch_runner import TorchRunner

    config, weights = load_weights(resolve_model("smollm2-135m"))
    runner = TorchRunner(
        config, weights, dtype="float32", device="cpu", block_size=16, eos_token_ids=frozenset()
    )
    grid = ProfileGrid.quick()
    num_blocks = grid.blocks_needed(16)
    storage = KVStorage(runner.layout, num_blocks)
    runner.bind(storage)
    kv = KVCacheManager(num_blocks, 16, storage)

    cost = profile(runner, kv, grid, model_name="smollm2-135m")

    assert kv.num_free_blocks == num_blocks
    assert all(block.ref_count == 0 for block in kv.pool.blocks)
    assert len(cost.metadata["measurements"]) == len(grid.points())
    assert cost.kv_bytes_per_token == runner.layout.bytes_per_token
    disturbed = sum(row["runs"] == 0 for row in cost.metadata["measurements"])
    if disturbed > len(grid.points()) // 2:
        pytest.skip(f"other processes disturbed every run of {disturbed} points: timings say nothing")
    assert cost.step_overhead_s > 0 and cost.per_token_s > 0 and cost.per_kv_gather_token_s > 0
    assert cost.per_attention_pair_s + cost.per_sample_s > 0
    assert cost.transfer_bandwidth_bytes_per_s > 0
    assert cost.metadata["fit_error"]["mean_abs_rel"] < 0.3
