"""The unified KV interface, with exact block ids, reference counts and eviction order."""

import pytest
import torch

from microserve.engine.kv_cache import KVCacheManager
from microserve.engine.kv_storage import KVLayout, KVPayloadError, KVStorage
from microserve.engine.sampling import SamplingParams
from microserve.engine.sequence import Sequence

BS = 4


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams())


def fill(kv: KVCacheManager, s: Sequence) -> None:
    """Admit a sequence the way the scheduler does and commit all of its tokens as computed."""
    cached = kv.match_prefix(s.token_ids)
    assert kv.allocate(s, s.num_tokens - len(cached) * BS, cached)
    kv.append(s, s.num_tokens - s.num_computed_tokens)


def refs(kv: KVCacheManager) -> list[int]:
    return [b.ref_count for b in kv.pool.blocks]


def test_allocate_takes_free_blocks_in_order_and_free_returns_them():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = seq(range(10))  # 3 blocks: 4 + 4 + 2
    assert kv.allocate(a, 10)
    assert a.block_table == [0, 1, 2]
    assert refs(kv) == [1, 1, 1, 0, 0, 0]
    assert kv.num_free_blocks == 3
    kv.free(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    assert refs(kv) == [0] * 6
    assert kv.num_free_blocks == 6


def test_allocate_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    a = seq(range(12))
    assert not kv.allocate(a, 12)
    assert a.block_table == [] and kv.num_free_blocks == 2


def test_append_registers_only_full_computed_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = seq(range(10))
    assert kv.allocate(a, 10)
    kv.append(a, 6)
    assert a.num_computed_tokens == 6
    assert len(a.block_hashes) == 1 and kv.pool.num_cached == 1
    kv.append(a, 4)
    assert len(a.block_hashes) == 2 and kv.pool.num_cached == 2  # the partial third block is not cached


def test_match_prefix_shares_blocks_and_counts_references():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = seq(range(10), "a")
    fill(kv, a)
    b = seq([*range(8), 99, 98, 97], "b")
    cached = kv.match_prefix(b.token_ids)
    assert [blk.block_id for blk in cached] == [0, 1]
    assert kv.allocate(b, b.num_tokens - 8, cached)
    assert b.block_table == [0, 1, 3]
    assert b.num_computed_tokens == 8
    assert refs(kv)[:4] == [2, 2, 1, 1]


def test_match_prefix_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    fill(kv, seq(range(8), "a"))
    # The same 8 tokens again: only the first block may be reused, so the last token gets logits.
    assert [b.block_id for b in kv.match_prefix(list(range(8)))] == [0]
    assert [b.block_id for b in kv.match_prefix(list(range(9)))] == [0, 1]
    assert [b.block_id for b in kv.match_prefix(list(range(8)), limit=8)] == [0, 1]


def test_chained_hash_distinguishes_same_block_after_different_parent():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    fill(kv, seq([1, 2, 3, 4, 5, 6, 7, 8, 0], "a"))
    # Second block's tokens equal, first block's differ: no hit at all.
    assert kv.match_prefix([9, 9, 9, 9, 5, 6, 7, 8, 0]) == []


def test_hash_collision_is_a_miss():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    fill(kv, seq([1, 2, 3, 4, 0], "a"))
    block = kv.pool.blocks[0]
    block.token_ids = (7, 7, 7, 7)  # as if another block's tokens had hashed the same
    assert kv.match_prefix([1, 2, 3, 4, 0]) == []


def test_eviction_is_lru_and_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = seq([*range(8), 100], "a")  # blocks 0, 1 full and cached, block 2 partial
    fill(kv, a)
    kv.free(a)  # released tail first: block 2 (uncached) -> free list; 1 then 0 -> evictable
    assert list(kv.pool._evictable) == [1, 0]
    assert kv.num_free_blocks == 4
    b = seq(range(50, 62), "b")  # needs 3 blocks: free 3, free 2, then evicts LRU block 1
    assert kv.allocate(b, 12)
    assert b.block_table == [3, 2, 1]
    assert kv.pool.num_evictions == 1
    assert [blk.block_id for blk in kv.match_prefix([*range(8), 100])] == [0]  # block 0 survived


def test_touching_an_evictable_block_revives_it():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = seq([*range(4), 9], "a")
    fill(kv, a)
    kv.free(a)
    b = seq([*range(4), 7, 7, 7, 7, 7], "b")  # reuses block 0, needs 2 more: exactly 2 others left
    cached = kv.match_prefix(b.token_ids)
    assert kv.allocate(b, 5, cached)
    assert b.block_table == [0, 2, 1]  # a's freed partial block 1 queued behind never-used block 2
    assert refs(kv) == [1, 1, 1]


def test_allocate_counts_revived_blocks_against_capacity():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    a = seq([*range(4), 9], "a")
    fill(kv, a)
    kv.free(a)
    b = seq([*range(4), 1, 2, 3, 4, 5, 6], "b")  # block 0 revived + 2 new would need 3
    cached = kv.match_prefix(b.token_ids)
    assert not kv.allocate(b, 6, cached)
    assert refs(kv) == [0, 0] and kv.num_free_blocks == 2 and b.block_table == []


def test_fork_shares_full_blocks_and_copies_partial_block():
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=2, block_size=BS, dtype="float32")
    storage = KVStorage(layout, num_blocks=6)
    kv = KVCacheManager(6, BS, storage)
    a = seq(range(6), "a")
    fill(kv, a)
    storage.k[:, 4:6] = 5.0  # a's partial block is block 1, slots 4..5
    child = seq(range(6), "c")
    assert kv.fork(a, child)
    assert child.block_table == [0, 2]
    assert refs(kv)[:3] == [2, 1, 1]
    assert torch.equal(storage.k[:, 8:10], storage.k[:, 4:6])
    kv.free(a)
    kv.free(child)
    assert kv.num_free_blocks == 6


def _storage_pair() -> tuple[KVCacheManager, KVCacheManager]:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=3, block_size=BS, dtype="float32")
    return (KVCacheManager(8, BS, KVStorage(layout, 8)), KVCacheManager(8, BS, KVStorage(layout, 8)))


def test_export_import_round_trip_any_token_range():
    src, dst = _storage_pair()
    a = seq(range(11), "a")
    fill(src, a)
    src.storage.k.normal_()
    src.storage.v.normal_()
    payload = src.export_kv(a, 3, 11)
    b = seq(range(11), "b")
    assert dst.allocate(b, 11)
    b.num_computed_tokens = 3  # as if the first 3 came from elsewhere
    assert dst.import_kv(b, payload) == (3, 11)
    got = dst.storage.k.index_select(1, dst.slots(b, 3, 11))
    want = src.storage.k.index_select(1, src.slots(a, 3, 11))
    assert torch.equal(got, want)


def test_import_rejects_corrupt_incompatible_and_mismatched_payloads():
    src, dst = _storage_pair()
    a = seq(range(8), "a")
    fill(src, a)
    payload = src.export_kv(a, 0, 8)
    b = seq(range(8), "b")
    assert dst.allocate(b, 8)
    corrupt = bytearray(payload)
    corrupt[-1] ^= 0xFF
    with pytest.raises(KVPayloadError, match="checksum"):
        dst.import_kv(b, bytes(corrupt))
    with pytest.raises(KVPayloadError, match="bad magic"):
        dst.import_kv(b, b"nonsense")
    with pytest.raises(KVPayloadError, match="truncated"):
        dst.import_kv(b, payload[:-4])
    other = KVCacheManager(8, BS, KVStorage(KVLayout(3, 2, 3, BS, "float32"), 8))
    c = seq(range(8), "c")
    fill(other, c)
    with pytest.raises(KVPayloadError, match="incompatible KV layout"):
        dst.import_kv(b, other.export_kv(c, 0, 8))
    wrong = seq([5, *range(1, 8)], "w")
    assert dst.allocate(wrong, 8)
    with pytest.raises(KVPayloadError, match="different tokens"):
        dst.import_kv(wrong, payload)


def test_import_never_overwrites_computed_blocks():
    src, dst = _storage_pair()
    a = seq(range(8), "a")
    fill(src, a)
    b = seq(range(8), "b")
    fill(dst, b)
    with pytest.raises(KVPayloadError, match="already held"):
        dst.import_kv(b, src.export_kv(a, 0, 8))


def test_a_block_outside_the_prefix_cache_has_no_cached_hash():
    from microserve.engine.block_pool import Block

    with pytest.raises(ValueError, match="block 7 is not in the prefix cache"):
        _ = Block(7).cached_hash
    assert Block(7, hash=123).cached_hash == 123


@pytest.mark.parametrize("name", ["float33", "Tensor", "float32x"])
def test_a_layout_names_a_real_torch_dtype(name):
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, block_size=BS, dtype=name)
    with pytest.raises(ValueError, match="is not a torch dtype"):
        _ = layout.torch_dtype
    assert KVLayout(1, 1, 2, BS, "bfloat16").torch_dtype is torch.bfloat16
