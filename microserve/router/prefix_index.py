"""An approximate index of which worker recently served which prompt prefix, for prefix-aware routing.

Prompts are cut into blocks (characters of text, or token ids) keyed by a chained hash, as the engine's
KV cache keys its blocks; the index keeps a bounded number of blocks and forgets the least recently used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import xxhash


class PrefixIndex:
    """`chained block hash -> workers`, LRU-bounded to `max_blocks` entries.

    Approximate by design: no collision check (a false hit costs one cache miss in the engine) and the
    engine's own eviction is not seen, so a worker is believed to hold a prefix until the index forgets it.
    """

    def __init__(self, block_size: int = 64, max_blocks: int = 65536) -> None:
        if block_size < 1 or max_blocks < 1:
            raise ValueError("block_size and max_blocks must be at least 1")
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[int, set[str]] = OrderedDict()
        # Told of every insert made here (router replicas publish them to the others), not of `learn`.
        self.on_insert: Callable[[Sequence[int], str], None] | None = None

    def __len__(self) -> int:
        return len(self._blocks)

    def hashes(self, prompt: str | Sequence[int]) -> list[int]:
        """Chained hashes of the prompt's full blocks (a partial last block is not indexed)."""
        size = self.block_size
        out: list[int] = []
        parent = 0
        for start in range(0, len(prompt) - size + 1, size):
            block = prompt[start : start + size]
            data = block.encode() if isinstance(block, str) else ",".join(map(str, block)).encode()
            parent = xxhash.xxh3_64_intdigest(data, seed=parent)
            out.append(parent)
        return out

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """For each worker, how many leading blocks of the prompt it holds (absent: none)."""
        lengths: dict[str, int] = {}
        alive: set[str] | None = None
        touched = 0
        for i, h in enumerate(hashes):
            holders = self._blocks.get(h)
            if not holders:
                break
            alive = set(holders) if alive is None else alive & holders
            if not alive:
                break
            for url in alive:
                lengths[url] = i + 1
            touched = i + 1
        self._touch(hashes[:touched])
        return lengths

    def insert(self, hashes: Sequence[int], url: str) -> None:
        self.learn(hashes, url)
        if self.on_insert is not None and hashes:
            self.on_insert(hashes, url)

    def learn(self, hashes: Sequence[int], url: str) -> None:
        """Insert what another router replica inserted (not told to `on_insert`)."""
        for h in hashes:
            holders = self._blocks.get(h)
            if holders is None:
                self._blocks[h] = {url}
            else:
                holders.add(url)
        self._touch(hashes)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def forget_worker(self, url: str) -> None:
        for h in [h for h, holders in self._blocks.items() if url in holders]:
            holders = self._blocks[h]
            holders.discard(url)
            if not holders:
                del self._blocks[h]

    def reassign(self, src: str, dst: str) -> None:
        """Every block believed held by `src` is believed held by `dst` too."""
        for holders in self._blocks.values():
            if src in holders:
                holders.add(dst)

    def _touch(self, hashes: Sequence[int]) -> None:
        # Deepest first, so a prompt's root ends most recent: eviction takes leaves before the blocks
        # they chain from, and a shared root is the last to go.
        for h in reversed(hashes):
            if h in self._blocks:
                self._blocks.move_to_end(h)
