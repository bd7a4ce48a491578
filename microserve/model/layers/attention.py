"""Attention over the paged K/V storage: decode rows against their whole context, each prefill chunk
causally (on its cached prefix, where it has one).

`paged_attention` chooses once, when built: with microserve's kernels, decode rows read their K/V straight
from the blocks (`kernels.paged_decode_attention`, given block tables); with torch's ops, decode rows
gather their context into a padded batch for SDPA. Prefill chunks run on SDPA either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from microserve.kernels import CpuOps


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


class PagedAttention:
    """torch's SDPA: decode rows over their gathered context (`meta.decode_slots`), prefill chunks causal."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_layer: torch.Tensor,
        v_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, heads, dim], this batch's k, v [T, kv_heads, dim] (already in the caches too) -> [T, heads,
        dim]."""
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            out[:nd] = self._decode(q[:nd], k_layer, v_layer, meta)
        for chunk in meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.length)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], k_layer, v_layer, chunk)
        return out

    def _decode(
        self, q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if meta.decode_tables is not None:
            raise RuntimeError("a batch prepared for microserve's CPU kernels reached a model without them")
        slots = meta.decode_slots
        if slots is None:
            raise ValueError("decode rows without decode_tables or decode_slots to read their K/V from")
        nd = len(q)
        shape = (*slots.shape, *k_layer.shape[1:])  # [B, L, kv_heads, head_dim]
        kd = k_layer.index_select(0, slots.flatten()).view(shape).transpose(1, 2)
        vd = v_layer.index_select(0, slots.flatten()).view(shape).transpose(1, 2)
        # The query heads that share a K/V head ride as that head's query rows: [B, kv_heads, group,
        # head_dim] against [B, kv_heads, L, head_dim]. Same sums as enable_gqa, without the kernel
        # repeating K/V for each query head (~30% less attention time on the bundled model).
        qd = q.view(nd, kd.shape[1], -1, q.shape[-1])
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=self.scale)
        return o.reshape(nd, -1, q.shape[-1])

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_layer: torch.Tensor,
        v_layer: torch.Tensor,
        chunk: PrefillChunk,
    ) -> torch.Tensor:
        qc = q.transpose(0, 1).unsqueeze(0)
        if chunk.context_slots is None:
            kc = k.transpose(0, 1).unsqueeze(0)
            vc = v.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            kc = k_layer.index_select(0, chunk.context_slots).transpose(0, 1).unsqueeze(0)
            vc = v_layer.index_select(0, chunk.context_slots).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qc, kc, vc, attn_mask=chunk.mask, scale=self.scale, enable_gqa=True
            )
        return o.squeeze(0).transpose(0, 1)


class KernelPagedAttention(PagedAttention):
    """Decode rows on microserve's kernel, straight from the blocks, where the batch has block tables (an
    all-decode batch: no copy at all); gathered as torch's otherwise. Prefill chunks as torch's."""

    def __init__(self, scale: float, kernels: CpuOps) -> None:
        super().__init__(scale)
        self._paged_decode = kernels.paged_decode_attention

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_layer: torch.Tensor,
        v_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if meta.paged_decode_only:  # no copy
            tables, lens = meta.paged_decode()
            return self._paged_decode(q, k_layer, v_layer, tables, lens, meta.block_size, self.scale)
        return super().__call__(q, k, v, k_layer, v_layer, meta)

    def _decode(
        self, q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if meta.decode_tables is None:
            return super()._decode(q, k_layer, v_layer, meta)
        tables, lens = meta.paged_decode()
        return self._paged_decode(q, k_layer, v_layer, tables, lens, meta.block_size, self.scale)


def paged_attention(scale: float, kernels: CpuOps | None) -> PagedAttention:
    """The kernel's decode attention where `kernels` are given (see `layers.kernels_for`), else torch's."""
    return PagedAttention(scale) if kernels is None else KernelPagedAttention(scale, kernels)
