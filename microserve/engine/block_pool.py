"""The pool of KV blocks: reference counts, the prefix-cache map and LRU eviction.

Blocks are ids only; the tensors behind them live in `KVStorage`.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import xxhash

ROOT_HASH = 0  # parent hash of a sequence's first block


def block_hash(parent_hash: int, token_ids: Seq[int]) -> int:
    """Chained block hash: the parent's hash seeds the hash of this block's token ids."""
    return xxhash.xxh3_64_intdigest(array("q", token_ids).tobytes(), seed=parent_hash)


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while the block is registered in the prefix cache
    parent_hash: int = ROOT_HASH
    token_ids: tuple[int, ...] = ()  # kept for the collision check
    hits: int = 0  # references taken to it while cached (prefix hits, forks): how hot it is
    last_used: int = 0  # the pool's tick when it was last taken or let go: how recent it is

    @property
    def cached_hash(self) -> int:
        """The hash of a block in the prefix cache (as `BlockPool.lookup` returns them)."""
        if self.hash is None:
            raise ValueError(f"block {self.block_id} is not in the prefix cache")
        return self.hash


class BlockPool:
    """Fixed pool of blocks.

    A block with ref_count 0 is either never-cached (in `_free`) or cached and evictable (in `_evictable`,
    least recently used first). Allocation prefers never-cached blocks, then evicts the LRU cached one.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, int] = {}  # hash -> block id
        self.num_evictions = 0
        self._tick = 0  # counts takes and releases, for `Block.last_used`

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks that an allocation can take: never-cached plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def lookup(self, parent_hash: int, token_ids: Seq[int]) -> Block | None:
        """The cached block holding exactly these tokens after this parent, or None."""
        block_id = self._cached.get(block_hash(parent_hash, token_ids))
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.parent_hash != parent_hash or block.token_ids != tuple(token_ids):
            return None  # a hash collision: treat as a miss
        return block

    def allocate(self) -> Block:
        """Take a free block (ref_count 1); raises MemoryError when none is left."""
        if self._free:
            block = self.blocks[self._free.popleft()]
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            block = self.blocks[block_id]
            self._uncache(block)
            self.num_evictions += 1
        else:
            raise MemoryError("no free KV block")
        block.ref_count = 1
        return block

    def touch(self, block: Block) -> None:
        """Take one more reference to a block (a prefix hit or a fork)."""
        if block.ref_count == 0:
            del self._evictable[block.block_id]
        block.ref_count += 1
        if block.hash is not None:
            block.hits += 1
        self._tick += 1
        block.last_used = self._tick

    def release(self, block: Block) -> None:
        """Drop one reference; an unreferenced block becomes free, or evictable if it is cached."""
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block.block_id} released more often than taken")
        block.ref_count -= 1
        self._tick += 1
        block.last_used = self._tick
        if block.ref_count == 0:
            if block.hash is None:
                self._free.append(block.block_id)
            else:
                self._evictable[block.block_id] = None  # most recently used end

    def cache(self, block: Block, parent_hash: int, token_ids: Seq[int], hash_: int) -> None:
        """Register a full, computed block under its chained hash (first writer wins)."""
        if block.hash is not None or hash_ in self._cached:
            return
        block.hash = hash_
        block.parent_hash = parent_hash
        block.token_ids = tuple(token_ids)
        self._cached[hash_] = block.block_id

    def cached_block(self, hash_: int) -> Block | None:
        """The block registered under `hash_` in the prefix cache, or None."""
        block_id = self._cached.get(hash_)
        return None if block_id is None else self.blocks[block_id]

    def cached_blocks(self) -> list[Block]:
        """Every block in the prefix cache (in use or evictable)."""
        return [self.blocks[block_id] for block_id in self._cached.values()]

    def _uncache(self, block: Block) -> None:
        if block.hash is not None:
            del self._cached[block.hash]
        block.hash = None
        block.parent_hash = ROOT_HASH
        block.token_ids = ()
        block.hits = 0

    def reset_prefix_cache(self) -> int:
        """Forget every evictable cached block; returns how many were dropped."""
        dropped = 0
        while self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            self._uncache(self.blocks[block_id])
            self._free.append(block_id)
            dropped += 1
        return dropped
