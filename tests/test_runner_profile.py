"""The profiler's fit: non-negative least squares, the grid, and the real model measured."""

from __future__ import annotations

import numpy as np
import pytest

from microserve.engine.kv_cache import KVCacheManager
from microserve.engine.kv_storage import KVStorage
from microserve.runner.profile import ProfileGrid, nnls_relative


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
    assert cost.step_overhead_s > 0 and cost.per_token_s > 0 and cost.per_kv_gather_token_s >= 0
    assert cost.per_attention_pair_s + cost.per_sample_s > 0
    assert cost.transfer_bandwidth_bytes_per_s > 0
    assert cost.metadata["fit_error"]["mean_abs_rel"] < 0.3
