"""Rotary position embeddings: the cos/sin tables (with Llama 3.1 and linear scaling), and RoPE on the
fused q/k/v projection's q and k with the K/V cache write (`qkv_rope`)."""

from __future__ import annotations

import torch

from microserve.kernels import CpuOps
from microserve.model.config import ModelConfig


class RotaryEmbedding:
    """cos/sin for every position in the model's dtype; `rotary(positions)` gives a batch's rows."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        cos, sin = rope_tables(config, device)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


class QKVRope:
    """Split the fused projection into q, k, v; RoPE on q and k; k and v into their cache slots.

    torch's eager ops: `apply_rope` on q and k, then index_copy_ into the layer's caches."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim

    def __call__(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        k_layer: torch.Tensor,
        v_layer: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(-1, self.num_heads, self.head_dim), cos[:, None], sin[:, None])
        k = apply_rope(k.view(-1, self.num_kv_heads, self.head_dim), cos[:, None], sin[:, None])
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        k_layer.index_copy_(0, slots, k)
        v_layer.index_copy_(0, slots, v)
        return q, k, v


class KernelQKVRope(QKVRope):
    """The same in one pass of microserve's kernel (`kernels.rope_qkv`), rounded as the eager ops; v is a
    view of the projection's output, written to the cache by the kernel."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, kernels: CpuOps) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim)
        self._rope_qkv = kernels.rope_qkv
        self._v_start = self.q_size + self.kv_size

    def __call__(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        k_layer: torch.Tensor,
        v_layer: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k = self._rope_qkv(qkv, cos, sin, self.num_heads, self.num_kv_heads, slots, k_layer, v_layer)
        return q, k, qkv[:, self._v_start :].view(-1, self.num_kv_heads, self.head_dim)


def qkv_rope(config: ModelConfig, kernels: CpuOps | None) -> QKVRope:
    """The kernel's q/k/v RoPE where `kernels` are given (see `layers.kernels_for`), else torch's."""
    c = config
    if kernels is None:
        return QKVRope(c.num_heads, c.num_kv_heads, c.head_dim)
    return KernelQKVRope(c.num_heads, c.num_kv_heads, c.head_dim, kernels)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, as transformers' Llama."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_tables(c: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every position, in float32 like transformers, then cast at use."""
    inv_freq = 1.0 / (
        c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim)
    )
    inv_freq = _scale_inv_freq(inv_freq, c)
    positions = torch.arange(c.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def _scale_inv_freq(inv_freq: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    scaling = c.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        # Llama 3.1's frequency-dependent scaling (long wavelengths scaled, short ones kept).
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * torch.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")
