"""model.layers.rope: rotary tables, and RoPE on the fused q/k/v with the K/V cache write."""

from __future__ import annotations

import pytest
import torch

from microserve.kernels import cpu_ops
from microserve.model.config import ModelConfig
from microserve.model.layers.rope import KernelQKVRope, QKVRope, RotaryEmbedding, apply_rope, qkv_rope

ops = cpu_ops()
needs_kernels = pytest.mark.skipif(ops is None, reason="microserve's CPU kernels could not be built here")


def _config(**overrides) -> ModelConfig:
    fields = dict(
        architecture="llama",
        vocab_size=100,
        hidden_size=6 * 64,
        intermediate_size=64,
        num_layers=1,
        num_heads=6,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def test_rotary_gives_the_rows_of_its_tables_in_the_model_dtype():
    rotary = RotaryEmbedding(_config(), torch.bfloat16, torch.device("cpu"))
    assert rotary.cos.shape == (256, 64) and rotary.cos.dtype == torch.bfloat16
    cos, sin = rotary(torch.tensor([0, 5, 5]))
    assert torch.equal(cos[0], torch.ones(64, dtype=torch.bfloat16)) and not sin[0].any()
    assert torch.equal(cos[1], rotary.cos[5]) and torch.equal(sin[2], rotary.sin[5])


def test_apply_rope_at_position_zero_is_the_identity_and_keeps_the_norm():
    x = torch.randn(3, 2, 64)
    angles = torch.rand(3, 32).repeat(1, 2) * 6
    assert torch.equal(apply_rope(x, torch.ones(3, 1, 64), torch.zeros(3, 1, 64)), x)
    rotated = apply_rope(x, angles.cos()[:, None], angles.sin()[:, None])
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


def _run(rope: QKVRope, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    tokens, slots_total = 5, 32
    qkv = torch.randn(tokens, (6 + 2 * 2) * 64).to(dtype)
    cos, sin = RotaryEmbedding(_config(), dtype, torch.device("cpu"))(torch.tensor([0, 1, 7, 100, 255]))
    k_cache, v_cache = torch.zeros(2, slots_total, 2, 64, dtype=dtype)
    q, k, v = rope(qkv, cos, sin, torch.tensor([3, 9, 0, 31, 4]), k_cache, v_cache)
    return q, k, v, k_cache, v_cache


def test_torch_rope_writes_k_and_v_into_their_slots():
    q, k, v, k_cache, v_cache = _run(qkv_rope(_config(), None), torch.float32)
    assert q.shape == (5, 6, 64) and k.shape == v.shape == (5, 2, 64)
    assert torch.equal(k_cache[[3, 9, 0, 31, 4]], k) and torch.equal(v_cache[[3, 9, 0, 31, 4]], v)
    assert not k_cache[1].any()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_rope_is_the_torch_rope(dtype):
    rope = qkv_rope(_config(), ops)
    assert isinstance(rope, KernelQKVRope)
    for got, want in zip(_run(rope, dtype), _run(qkv_rope(_config(), None), dtype), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
