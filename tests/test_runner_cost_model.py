"""The cost model's arithmetic: step features, step and transfer times, its JSON, the saved profile."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from microserve.engine.scheduler import ScheduledBatch
from microserve.runner.cost_model import CostModel, attention_pairs, step_features
from microserve.runner.sim_runner import SimRunner
from tests.runner_fakes import COST, WORDS, FakeClock, make_seq

REPO = Path(__file__).resolve().parents[1]


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
