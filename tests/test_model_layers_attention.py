"""model.layers.attention: attention over the paged K/V storage, torch's SDPA or the paged decode kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from microserve.kernels import cpu_ops
from microserve.model.layers.attention import (
    AttentionMetadata,
    KernelPagedAttention,
    PagedAttention,
    PrefillChunk,
    paged_attention,
)

ops = cpu_ops()
needs_kernels = pytest.mark.skipif(ops is None, reason="microserve's CPU kernels could not be built here")
HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 64, 4
SCALE = DIM**-0.5


def _caches(slots: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(slots, KV_HEADS, DIM), torch.randn(slots, KV_HEADS, DIM)


def _decode_meta(lens: list[int], *, tables: bool) -> AttentionMetadata:
    """Sequence b owns blocks 4b.. (in reverse, so tables matter); padding repeats a valid slot."""
    width = max(lens)
    table = torch.tensor([[4 * b + 3 - i for i in range(4)] for b in range(len(lens))])
    pos = torch.arange(width).clamp(max=torch.tensor(lens)[:, None] - 1)
    slots = table.gather(1, pos // BLOCK) * BLOCK + pos % BLOCK
    mask = torch.arange(width)[None, :] < torch.tensor(lens)[:, None]
    return AttentionMetadata(
        slot_mapping=slots[torch.arange(len(lens)), torch.tensor(lens) - 1],
        num_decode=len(lens),
        decode_slots=None if tables else slots,
        decode_tables=table if tables else None,
        decode_lens=torch.tensor(lens) if tables else None,
        block_size=BLOCK,
        decode_mask=None if tables else mask[:, None, None, :],
    )


def _reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata):
    assert meta.decode_slots is not None and meta.decode_mask is not None
    outs = []
    for b, lens in enumerate(meta.decode_mask.sum(-1).flatten().tolist()):
        slots = meta.decode_slots[b, :lens]
        k, v = k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1)
        o = F.scaled_dot_product_attention(q[b].view(KV_HEADS, -1, DIM), k, v, scale=SCALE)
        outs.append(o.reshape(HEADS, DIM))
    return torch.stack(outs)


def test_torch_decode_attends_over_each_gathered_context():
    k_cache, v_cache = _caches()
    q = torch.randn(3, HEADS, DIM)
    meta = _decode_meta([5, 16, 9], tables=False)
    attention = paged_attention(SCALE, None)
    assert type(attention) is PagedAttention
    got = attention(q, q[:, :KV_HEADS], q[:, :KV_HEADS], k_cache, v_cache, meta)
    torch.testing.assert_close(got, _reference(q, k_cache, v_cache, meta))


def test_torch_attention_refuses_a_batch_prepared_for_the_kernels():
    k_cache, v_cache = _caches()
    q = torch.randn(2, HEADS, DIM)
    with pytest.raises(RuntimeError, match="reached a model without them"):
        PagedAttention(SCALE)(q, q, q, k_cache, v_cache, _decode_meta([3, 4], tables=True))


def test_a_prefill_chunk_on_a_cached_prefix_is_causal_over_prefix_and_chunk():
    k_cache, v_cache = _caches()
    prefix, length = 5, 3
    context = torch.arange(10, 10 + prefix + length)
    mask = torch.ones(length, prefix + length, dtype=torch.bool).tril(prefix)
    q = torch.randn(length, HEADS, DIM)
    meta = AttentionMetadata(slot_mapping=context[prefix:], prefills=[PrefillChunk(0, length, context, mask)])
    got = PagedAttention(SCALE)(
        q, k_cache[context[prefix:]], v_cache[context[prefix:]], k_cache, v_cache, meta
    )
    for i in range(length):  # row i sees the prefix and chunk rows 0..i
        seen = context[: prefix + i + 1]
        k, v = k_cache[seen].transpose(0, 1), v_cache[seen].transpose(0, 1)
        want = F.scaled_dot_product_attention(q[i].view(KV_HEADS, -1, DIM), k, v, scale=SCALE)
        torch.testing.assert_close(got[i], want.reshape(HEADS, DIM))


@needs_kernels
def test_the_kernel_reads_the_blocks_the_torch_path_gathers():
    k_cache, v_cache = _caches()
    q = torch.randn(3, HEADS, DIM)
    attention = paged_attention(SCALE, ops)
    assert isinstance(attention, KernelPagedAttention)
    lens = [5, 16, 9]
    got = attention(q, q, q, k_cache, v_cache, _decode_meta(lens, tables=True))
    want = PagedAttention(SCALE)(q, q, q, k_cache, v_cache, _decode_meta(lens, tables=False))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Without tables (a gathered batch), the kernel's layer runs torch's path.
    gathered = attention(q, q, q, k_cache, v_cache, _decode_meta(lens, tables=False))
    assert torch.equal(gathered, want)
