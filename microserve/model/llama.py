"""Llama-family decoder (Llama, SmolLM2, Qwen2 with q/k/v bias, Mistral) over a paged KV cache.

Linear layers run on the batch's tokens flattened to [T, hidden]; attention reads K/V from the paged
storage: decode tokens as one padded batch, each prefill chunk on its own (it may sit on a cached prefix).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from microserve.kernels import CpuOps, cpu_ops
from microserve.model.config import ModelConfig
from microserve.model.loader import QuantizedTensor
from microserve.model.quant import DenseLinear, Int4Linear, Int8Linear, Linear, dequantize_blocks


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first row of the chunk in the flattened batch
    length: int  # new tokens in this chunk
    context_slots: torch.Tensor | None  # slots of the whole context (prefix + chunk); None: no prefix
    mask: torch.Tensor | None  # [length, context] causal mask with the prefix offset


@dataclass(slots=True)
class AttentionMetadata:
    """How the flattened batch maps onto the paged KV storage. Decode rows come first."""

    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int = 0
    decode_slots: torch.Tensor | None = None  # [num_decode, max_context] (padding repeats a valid slot)
    decode_tables: torch.Tensor | None = None  # [num_decode, max_blocks] for the paged decode kernel
    decode_lens: torch.Tensor | None = None  # [num_decode] context lengths, new token included
    block_size: int = 0
    decode_mask: torch.Tensor | None = None  # [num_decode, 1, 1, max_context]; None when no padding
    prefills: list[PrefillChunk] = field(default_factory=list)

    @property
    def paged_decode_only(self) -> bool:
        """Every row decodes, and the paged decode kernel reads the blocks (`decode_tables`)."""
        return self.num_decode > 0 and self.decode_tables is not None and not self.prefills

    def paged_decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode rows' block tables and context lengths, which the paged decode kernels read."""
        if self.decode_tables is None or self.decode_lens is None:
            raise ValueError("this batch has no block tables for the paged decode kernels")
        return self.decode_tables, self.decode_lens


class Llama(torch.nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        quantized: Mapping[str, QuantizedTensor] | None = None,
    ) -> None:
        """`quantized`: GGUF int4 weights to keep packed (see `model.quant`); `weights` has the rest."""
        super().__init__()
        self.config = config
        c = config
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self.scale = c.head_dim**-0.5
        quantized = quantized or {}

        def w(name: str) -> torch.Tensor:
            # A fused group can mix kept and dequantized parts (llama.cpp stores a tensor in another
            # type where its rows do not fit the block): the whole group is then dense.
            weight = weights[name] if name in weights else dequantize_blocks(quantized[name])
            return weight.to(device=device, dtype=dtype)

        def linear(*names: str, gate_up: bool = False) -> Linear:
            # Fused projections: one matmul for q/k/v and one for gate/up instead of five.
            if all(n in quantized for n in names):
                return Int4Linear.from_gguf([quantized[n] for n in names], dtype, gate_up=gate_up)
            return DenseLinear(torch.cat([w(n) for n in names]), gate_up)

        self.embed = w("model.embed_tokens.weight")  # looked up: always dequantized
        self.lm_head: Linear = DenseLinear(self.embed) if c.tie_word_embeddings else linear("lm_head.weight")
        embed_blocks = quantized.get("model.embed_tokens.weight")
        if isinstance(self.lm_head, DenseLinear) and c.tie_word_embeddings and embed_blocks is not None:
            self.lm_head = Int8Linear.from_gguf(embed_blocks, self.lm_head)  # on the embedding's own blocks
        self.final_norm = w("model.norm.weight")
        self.layers: list[dict[str, Any]] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            bias = None
            if c.attention_bias:
                bias = torch.cat([w(attn + "q_proj.bias"), w(attn + "k_proj.bias"), w(attn + "v_proj.bias")])
            self.layers.append(
                {
                    "input_norm": w(p + "input_layernorm.weight"),
                    "qkv": linear(attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                    "qkv_bias": bias,
                    "o": linear(attn + "o_proj.weight"),
                    "post_norm": w(p + "post_attention_layernorm.weight"),
                    "gate_up": linear(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", gate_up=True),
                    "down": linear(p + "mlp.down_proj.weight"),
                }
            )
        cos, sin = _rope_tables(c, device)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        # microserve's CPU kernels (decode attention over the paged blocks, fused norms and SwiGLU) where
        # they can be built; torch's ops otherwise.
        on_cpu = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        self.kernels = cpu_ops() if on_cpu else None
        # A decode step's layers in one call to the kernels (`_decode_tiles`) where they all run on AMX.
        self.fused_decode = self.kernels is not None and dtype == torch.bfloat16
        self._tiles_by_rows: dict[int, list[torch.Tensor] | None] = {}
        self._norms = [layer[n] for layer in self.layers for n in ("input_norm", "post_norm")]
        self._qkv_biases = [layer["qkv_bias"] for layer in self.layers] if c.attention_bias else []

    def linear(self, x: torch.Tensor, layer: Linear, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias), whatever form the weight is kept in."""
        return layer(x, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, exactly as transformers does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return weight * h.to(x.dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor
    ) -> torch.Tensor:
        """x += residual (in place, when given), then rms_norm(x): one pass with the CPU kernels."""
        if self.kernels is not None:
            return self.kernels.add_rms_norm(x, residual, weight, self.config.rms_norm_eps)
        if residual is not None:
            x += residual
        return self.rms_norm(x, weight)

    def rope_and_cache(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        k_layer: torch.Tensor,
        v_layer: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split the fused projection into q, k, v; RoPE on q and k; k and v into their cache slots."""
        c = self.config
        if self.kernels is not None:
            q, k = self.kernels.rope_qkv(qkv, cos, sin, c.num_heads, c.num_kv_heads, slots, k_layer, v_layer)
            return q, k, qkv[:, self.q_size + self.kv_size :].view(-1, c.num_kv_heads, c.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = _rope(q.view(-1, c.num_heads, c.head_dim), cos[:, None], sin[:, None])
        k = _rope(k.view(-1, c.num_kv_heads, c.head_dim), cos[:, None], sin[:, None])
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        k_layer.index_copy_(0, slots, k)
        v_layer.index_copy_(0, slots, v)
        return q, k, v

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        logit_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Run the flattened batch; return the logits of the rows in `logit_rows`, in the model's dtype."""
        x = self._residual(input_ids, positions, meta, k_cache, v_cache)
        x = self.rms_norm(x[logit_rows], self.final_norm)
        return self.linear(x, self.lm_head)

    @torch.inference_mode()
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Every row's final hidden state (after the final norm, as transformers' `last_hidden_state`):
        the same layers as `forward`, without the head. For embeddings."""
        return self.rms_norm(self._residual(input_ids, positions, meta, k_cache, v_cache), self.final_norm)

    def _residual(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """The residual stream after the last layer, for every row of the batch."""
        cos, sin = self.cos[positions], self.sin[positions]
        x = F.embedding(input_ids, self.embed)
        tiles = self._decode_tiles(meta, len(input_ids))
        if tiles is not None:  # the same kernels on the same tensors as the loop below, in one call
            c = self.config
            tables, lens = meta.paged_decode()
            self._loaded_kernels().decode_layers(
                x,
                self._norms,
                tiles,
                self._qkv_biases,
                cos,
                sin,
                meta.slot_mapping,
                k_cache,
                v_cache,
                tables,
                lens,
                meta.block_size,
                c.num_heads,
                self.scale,
                c.rms_norm_eps,
            )
        else:
            self._layers(x, cos, sin, meta, k_cache, v_cache)
        return x

    def _layers(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> None:
        """Every layer over x (updated in place: the residual stream)."""
        residual: torch.Tensor | None = None  # the last layer's MLP output, still to add to x
        for i, layer in enumerate(self.layers):
            h = self.add_rms_norm(x, residual, layer["input_norm"])
            qkv = self.linear(h, layer["qkv"], layer["qkv_bias"])
            q, k, v = self.rope_and_cache(qkv, cos, sin, meta.slot_mapping, k_cache[i], v_cache[i])
            attn = self._attention(q, k, v, k_cache[i], v_cache[i], meta)
            attn = self.linear(attn.reshape(-1, self.q_size), layer["o"])
            h = self.add_rms_norm(x, attn, layer["post_norm"])
            residual = self.linear(layer["gate_up"].silu_mul(h), layer["down"])
        if residual is not None:
            x += residual

    def _decode_tiles(self, meta: AttentionMetadata, rows: int) -> list[torch.Tensor] | None:
        """For an all-decode batch whose every linear layer runs on AMX tiles at `rows` rows: those tiles,
        four a layer, for `kernels.decode_layers`; None otherwise."""
        if not self.fused_decode or not meta.paged_decode_only:
            return None
        if rows not in self._tiles_by_rows:
            names = ("qkv", "o", "gate_up", "down")
            tiles = [layer[n].amx_tiles(rows) for layer in self.layers for n in names]
            self._tiles_by_rows[rows] = None if any(t is None for t in tiles) else tiles
        return self._tiles_by_rows[rows]

    def _loaded_kernels(self) -> CpuOps:
        """The CPU kernels, for a batch prepared for them: the runner gives decode tables, and
        `_decode_tiles` tiles, only to a model that runs with them."""
        if self.kernels is None:
            raise RuntimeError("a batch prepared for microserve's CPU kernels reached a model without them")
        return self.kernels

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_layer: torch.Tensor,
        v_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        nd = meta.num_decode
        if meta.paged_decode_only:  # no copy
            tables, lens = meta.paged_decode()
            return self._loaded_kernels().paged_decode_attention(
                q, k_layer, v_layer, tables, lens, meta.block_size, self.scale
            )
        out = torch.empty_like(q)
        if nd and meta.decode_tables is not None:
            tables, lens = meta.paged_decode()
            out[:nd] = self._loaded_kernels().paged_decode_attention(
                q[:nd], k_layer, v_layer, tables, lens, meta.block_size, self.scale
            )
        elif nd:
            slots = meta.decode_slots
            if slots is None:
                raise ValueError("decode rows without decode_tables or decode_slots to read their K/V from")
            shape = (*slots.shape, *k_layer.shape[1:])  # [B, L, kv_heads, head_dim]
            kd = k_layer.index_select(0, slots.flatten()).view(shape).transpose(1, 2)
            vd = v_layer.index_select(0, slots.flatten()).view(shape).transpose(1, 2)
            # The query heads that share a K/V head ride as that head's query rows: [B, kv_heads, group,
            # head_dim] against [B, kv_heads, L, head_dim]. Same sums as enable_gqa, without the kernel
            # repeating K/V for each query head (~30% less attention time on the bundled model).
            qd = q[:nd].view(nd, kd.shape[1], -1, q.shape[-1])
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=self.scale)
            out[:nd] = o.reshape(nd, -1, q.shape[-1])
        for chunk in meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.length)
            qc = q[rows].transpose(0, 1).unsqueeze(0)
            if chunk.context_slots is None:
                kc = k[rows].transpose(0, 1).unsqueeze(0)
                vc = v[rows].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(
                    qc, kc, vc, is_causal=True, scale=self.scale, enable_gqa=True
                )
            else:
                kc = k_layer.index_select(0, chunk.context_slots).transpose(0, 1).unsqueeze(0)
                vc = v_layer.index_select(0, chunk.context_slots).transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(
                    qc, kc, vc, attn_mask=chunk.mask, scale=self.scale, enable_gqa=True
                )
            out[rows] = o.squeeze(0).transpose(0, 1)
        return out


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _rope_tables(c: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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
