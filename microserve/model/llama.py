"""Llama-family decoder (Llama, SmolLM2, Qwen2 with q/k/v bias, Mistral) over a paged KV cache.

Linear layers run on the batch's tokens flattened to [T, hidden]; attention reads K/V from the paged
storage: decode tokens as one padded batch, each prefill chunk on its own (it may sit on a cached prefix).
The layers are `model.layers`' modules; each chose microserve's CPU kernels or torch's ops when built.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from microserve.kernels import CpuOps
from microserve.model.config import ModelConfig
from microserve.model.layers import kernels_for
from microserve.model.layers.attention import AttentionMetadata, PagedAttention, PrefillChunk, paged_attention
from microserve.model.layers.embedding import Embedding
from microserve.model.layers.linear import DenseLinear, Int4Linear, Int8Linear, Linear
from microserve.model.layers.mlp import MLP, silu_and_mul
from microserve.model.layers.norm import RMSNorm, rms_norm
from microserve.model.layers.rope import QKVRope, RotaryEmbedding, qkv_rope
from microserve.model.quant import QuantizedTensor, dequantize_blocks

__all__ = ["AttentionMetadata", "DecoderLayer", "Llama", "PrefillChunk"]


class DecoderLayer:
    """One transformer block: norm, q/k/v, RoPE + cache write, attention, o, norm, MLP."""

    def __init__(
        self,
        input_norm: RMSNorm,
        qkv: Linear,
        qkv_bias: torch.Tensor | None,
        rope: QKVRope,
        attention: PagedAttention,
        o: Linear,
        post_norm: RMSNorm,
        mlp: MLP,
    ) -> None:
        self.input_norm, self.qkv, self.qkv_bias, self.rope = input_norm, qkv, qkv_bias, rope
        self.attention, self.o, self.post_norm, self.mlp = attention, o, post_norm, mlp
        self.q_size = rope.q_size

    def __call__(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        k_layer: torch.Tensor,
        v_layer: torch.Tensor,
    ) -> torch.Tensor:
        """x += residual (the last layer's MLP output), then this layer: x gets the attention's output
        added in place; returns the MLP's output, for the next layer (or the model) to add."""
        h = self.input_norm(x, residual)
        qkv = self.qkv(h, self.qkv_bias)
        q, k, v = self.rope(qkv, cos, sin, meta.slot_mapping, k_layer, v_layer)
        attn = self.attention(q, k, v, k_layer, v_layer, meta)
        h = self.post_norm(x, self.o(attn.reshape(-1, self.q_size)))
        return self.mlp(h)

    def linears(self) -> tuple[Linear, Linear, Linear, Linear]:
        """q/k/v, o, gate/up, down: the order `kernels.decode_layers` takes their tiles in."""
        return self.qkv, self.o, self.mlp.gate_up, self.mlp.down


class Llama(torch.nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        quantized: Mapping[str, QuantizedTensor] | None = None,
    ) -> None:
        """`quantized`: GGUF int4 weights to keep packed (see `model.layers.linear`); `weights` has the
        rest. microserve's CPU kernels run the layers where they apply to `device` and `dtype` (and can be
        built); torch's ops otherwise: each layer chose here, once."""
        super().__init__()
        self.config = config
        c = config
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self.scale = c.head_dim**-0.5
        self.kernels: CpuOps | None = kernels_for(device, dtype)
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

        def norm(name: str) -> RMSNorm:
            return rms_norm(w(name), c.rms_norm_eps, self.kernels)

        self.embed = Embedding(w("model.embed_tokens.weight"))  # looked up: always dequantized
        self.lm_head: Linear = (
            DenseLinear(self.embed.weight) if c.tie_word_embeddings else linear("lm_head.weight")
        )
        embed_blocks = quantized.get("model.embed_tokens.weight")
        if isinstance(self.lm_head, DenseLinear) and c.tie_word_embeddings and embed_blocks is not None:
            self.lm_head = Int8Linear.from_gguf(embed_blocks, self.lm_head)  # on the embedding's own blocks
        # The final norm runs on the logit rows alone, in torch's ops as transformers does.
        self.final_norm = RMSNorm(w("model.norm.weight"), c.rms_norm_eps)
        self.rotary = RotaryEmbedding(c, dtype, device)
        act = silu_and_mul(self.kernels)
        self.layers: list[DecoderLayer] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            bias = None
            if c.attention_bias:
                bias = torch.cat([w(attn + "q_proj.bias"), w(attn + "k_proj.bias"), w(attn + "v_proj.bias")])
            self.layers.append(
                DecoderLayer(
                    input_norm=norm(p + "input_layernorm.weight"),
                    qkv=linear(attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                    qkv_bias=bias,
                    rope=qkv_rope(c, self.kernels),
                    attention=paged_attention(self.scale, self.kernels),
                    o=linear(attn + "o_proj.weight"),
                    post_norm=norm(p + "post_attention_layernorm.weight"),
                    mlp=MLP(
                        linear(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", gate_up=True),
                        linear(p + "mlp.down_proj.weight"),
                        act,
                    ),
                )
            )
        # A decode step's layers in one call to the kernels (`_decode_tiles`) where they all run on AMX.
        self.fused_decode = self.kernels is not None and dtype == torch.bfloat16
        self._tiles_by_rows: dict[int, list[torch.Tensor] | None] = {}
        self._norms = [norm.weight for layer in self.layers for norm in (layer.input_norm, layer.post_norm)]
        self._qkv_biases = [layer.qkv_bias for layer in self.layers if layer.qkv_bias is not None]

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
        return self.lm_head(self.final_norm(x[logit_rows]))

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
        return self.final_norm(self._residual(input_ids, positions, meta, k_cache, v_cache))

    def _residual(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """The residual stream after the last layer, for every row of the batch."""
        cos, sin = self.rotary(positions)
        x = self.embed(input_ids)
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
            residual: torch.Tensor | None = None  # the last layer's MLP output, still to add to x
            for i, layer in enumerate(self.layers):
                residual = layer(x, residual, cos, sin, meta, k_cache[i], v_cache[i])
            if residual is not None:
                x += residual
        return x

    def _decode_tiles(self, meta: AttentionMetadata, rows: int) -> list[torch.Tensor] | None:
        """For an all-decode batch whose every linear layer runs on AMX tiles at `rows` rows: those tiles,
        four a layer, for `kernels.decode_layers`; None otherwise."""
        if not self.fused_decode or not meta.paged_decode_only:
            return None
        if rows not in self._tiles_by_rows:
            found = [linear.amx_tiles(rows) for layer in self.layers for linear in layer.linears()]
            tiles = [t for t in found if t is not None]
            self._tiles_by_rows[rows] = tiles if len(tiles) == len(found) else None
        return self._tiles_by_rows[rows]

    def _loaded_kernels(self) -> CpuOps:
        """The CPU kernels, for a batch prepared for them: the runner gives decode tables, and
        `_decode_tiles` tiles, only to a model that runs with them."""
        if self.kernels is None:
            raise RuntimeError("a batch prepared for microserve's CPU kernels reached a model without them")
        return self.kernels
