"""The hottest cached prefixes of a KV cache: chains of whole blocks, ranked by hits then recency."""

from __future__ import annotations

from microserve.engine.hot_prefixes import hot_prefixes
from microserve.engine.kv_cache import KVCacheManager
from microserve.engine.sampling import SamplingParams
from microserve.engine.sequence import Sequence

BS = 4


def run(kv: KVCacheManager, ids: list[int], name: str) -> None:
    """A request that computes `ids` (reusing what is cached) and finishes."""
    seq = Sequence(name, list(ids), SamplingParams(max_tokens=1))
    cached = kv.match_prefix(ids, limit=len(ids))
    assert kv.allocate(seq, len(ids) - len(cached) * BS, cached)
    kv.append(seq, len(ids) - seq.num_computed_tokens)
    kv.free(seq)


def test_hottest_first_longest_chain_only_and_within_the_budget() -> None:
    kv = KVCacheManager(num_blocks=32, block_size=BS)
    doc = list(range(100, 108))  # 2 blocks, asked 3 times with different tails
    cold = list(range(200, 212))  # 3 blocks, once
    for i in range(3):
        run(kv, doc + [300 + i] * BS, f"q{i}")
    run(kv, cold, "cold")
    found = hot_prefixes(kv.pool, max_tokens=1000, limit=10)
    assert found[0][: len(doc)] == doc  # the document, hit twice, leads (with one of its tails)
    assert cold in found
    assert all(len(p) % BS == 0 for p in found)
    assert not any(a != b and b[: len(a)] == a for a in found for b in found)  # no prefix of another
    # Within the budget: 8 tokens hold the document's two blocks and nothing else.
    assert hot_prefixes(kv.pool, max_tokens=8, limit=10) == [doc]
    assert sum(len(p) for p in hot_prefixes(kv.pool, max_tokens=13, limit=10)) <= 13
    assert hot_prefixes(kv.pool, max_tokens=1000, limit=1) == found[:1]
    assert kv.num_free_blocks == kv.num_blocks  # reading takes nothing


def test_an_evicted_ancestor_hides_its_chain_and_an_empty_cache_has_none() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    assert hot_prefixes(kv.pool, 100, 10) == []
    run(kv, list(range(12)), "a")  # 3 blocks cached
    run(kv, list(range(50, 58)), "b")  # takes 2 blocks: the LRU root of "a" goes first
    for ids in hot_prefixes(kv.pool, 100, 10):
        assert ids[:BS] in ([0, 1, 2, 3], [50, 51, 52, 53])
        assert kv.match_prefix(ids, limit=len(ids)) and len(kv.match_prefix(ids, limit=len(ids))) * BS == len(
            ids
        )
