"""Which prefixes an engine's KV cache holds that are worth keeping: its hottest cached block chains.

Read when an engine leaves the fleet, so that a surviving engine can receive them first (the autoscaler's
prefix hand-off, `microserve/router/handoff.py`). A chain runs from a root block to a cached block, whole
blocks only; blocks are ranked by how often they were hit, then how recently they were used, and the chain
to each is taken, deepest first, until `max_tokens` of new tokens or `limit` chains.
"""

from __future__ import annotations

from microserve.engine.block_pool import ROOT_HASH, Block, BlockPool


def chain_to(pool: BlockPool, block: Block) -> list[Block] | None:
    """The cached blocks from the root to `block`, or None when an ancestor was evicted (unreachable)."""
    chain = [block]
    while chain[-1].parent_hash != ROOT_HASH:
        parent = pool.cached_block(chain[-1].parent_hash)
        if parent is None:
            return None
        chain.append(parent)
    chain.reverse()
    return chain


def hot_prefixes(pool: BlockPool, max_tokens: int, limit: int) -> list[list[int]]:
    """The token ids of the hottest cached prefixes, hottest first; each a whole number of blocks.

    A prefix that extends one already taken replaces it (only its new blocks count against `max_tokens`),
    so the answer holds no prefix of another.
    """
    if max_tokens < 1 or limit < 1:
        return []
    ranked = sorted(pool.cached_blocks(), key=lambda b: (b.hits, b.last_used), reverse=True)
    chosen: dict[int, list[Block]] = {}  # tip hash -> its chain, in the order taken
    covered: set[int] = set()
    budget = max_tokens
    for block in ranked:
        if block.cached_hash in covered:
            continue
        chain = chain_to(pool, block)
        if chain is None:
            continue
        new = sum(len(b.token_ids) for b in chain if b.cached_hash not in covered)
        if new > budget:
            continue
        extended = [b.cached_hash for b in chain if b.cached_hash in chosen]
        if not extended and len(chosen) >= limit:
            continue
        budget -= new
        if extended:  # the longer chain takes the place of the first one it extends
            gone = set(extended[1:])
            tip = block.cached_hash
            chosen = {
                (tip if h == extended[0] else h): (chain if h == extended[0] else c)
                for h, c in chosen.items()
                if h not in gone
            }
        else:
            chosen[block.cached_hash] = chain
        covered.update(b.cached_hash for b in chain)
    return [[t for b in chain for t in b.token_ids] for chain in chosen.values()]
