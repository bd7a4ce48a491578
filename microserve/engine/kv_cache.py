"""The unified KV interface: every path (a request, a prefill for another engine, a received transfer,
a migration) reserves, shares, fills and frees KV blocks through these operations.

`match_prefix` finds cached blocks, `allocate` reserves blocks for new tokens, `append` commits computed
tokens (registering newly full blocks in the prefix cache), `fork` shares a sequence's blocks, `free`
drops them, `export_kv`/`import_kv` move a token range's KV as bytes.
"""

from __future__ import annotations

import torch

from microserve.engine.block_pool import ROOT_HASH, Block, BlockPool, block_hash
from microserve.engine.kv_storage import KVPayload, KVPayloadError, KVStorage, parse_payload, tokens_hash
from microserve.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        storage: KVStorage | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.storage = storage
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # prompt tokens looked up at admission
        self.prefix_hits = 0  # of which found in the cache

    # -- capacity ---------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-evictable blocks count as free)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # -- the operations ---------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int], limit: int | None = None) -> list[Block]:
        """The longest chain of cached full blocks that prefixes `token_ids[:limit]`.

        `limit` defaults to len - 1 so that at least one token is left to compute (its logits are
        needed to sample). No reference is taken: pass the result to `allocate`.
        """
        if not self.enable_prefix_caching:
            return []
        limit = len(token_ids) - 1 if limit is None else limit
        bs = self.block_size
        blocks: list[Block] = []
        parent = ROOT_HASH
        for i in range(max(limit, 0) // bs):
            block = self.pool.lookup(parent, token_ids[i * bs : (i + 1) * bs])
            if block is None:
                break
            blocks.append(block)
            parent = block.cached_hash
        return blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[Block] | None = None) -> bool:
        """Reserve blocks so `seq` can hold `num_new_tokens` more tokens after its computed ones.

        `cached` (from `match_prefix`, only for a sequence with no blocks yet) is taken first and
        counts as computed. All or nothing: returns False and changes nothing when blocks run out.
        """
        cached = cached or []
        if cached and seq.block_table:
            raise ValueError("cached prefix blocks can only start an empty sequence")
        bs = self.block_size
        total = seq.num_computed_tokens + len(cached) * bs + num_new_tokens
        need = cdiv(total, bs) - len(seq.block_table) - len(cached)
        revived = sum(1 for b in cached if b.ref_count == 0)  # these leave the free count when taken
        if need > self.pool.num_free - revived:
            return False
        for block in cached:
            self.pool.touch(block)
            seq.block_table.append(block.block_id)
            seq.block_hashes.append(block.cached_hash)
        seq.num_computed_tokens += len(cached) * bs
        for _ in range(max(need, 0)):
            seq.block_table.append(self.pool.allocate().block_id)
        return True

    def record_admission(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    def append(self, seq: Sequence, num_tokens: int) -> None:
        """Commit `num_tokens` newly computed tokens; newly full blocks enter the prefix cache."""
        seq.num_computed_tokens += num_tokens
        if seq.num_computed_tokens > len(seq.block_table) * self.block_size:
            raise RuntimeError(f"{seq.request_id}: committed tokens beyond its reserved blocks")
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            h = block_hash(parent, tokens)
            self.pool.cache(self.pool.blocks[seq.block_table[i]], parent, tokens, h)
            seq.block_hashes.append(h)

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Give `child` the parent's computed KV: full blocks shared, the partial last block copied."""
        if child.block_table:
            raise ValueError("fork needs a child without blocks")
        bs = self.block_size
        num_full = parent.num_computed_tokens // bs
        partial = parent.num_computed_tokens % bs
        if partial and self.pool.num_free < 1:
            return False
        for block_id in parent.block_table[:num_full]:
            self.pool.touch(self.pool.blocks[block_id])
            child.block_table.append(block_id)
        if partial:
            block = self.pool.allocate()
            if self.storage is not None:
                self.storage.copy_block(parent.block_table[num_full], block.block_id)
            child.block_table.append(block.block_id)
        child.block_hashes = list(parent.block_hashes[:num_full])
        child.num_computed_tokens = parent.num_computed_tokens
        return True

    def rewind(self, seq: Sequence, num_tokens: int) -> bool:
        """Forget computed KV from `num_tokens` on, so those tokens can be computed again.

        The block that will be rewritten is made private first (copy-on-write) when it is shared or
        cached; returns False, changing nothing, when no block is free for the copy.
        """
        if num_tokens > seq.num_computed_tokens:
            raise ValueError(f"cannot rewind {seq.request_id} forward to {num_tokens}")
        i = num_tokens // self.block_size
        if i < len(seq.block_table):
            block = self.pool.blocks[seq.block_table[i]]
            if block.ref_count > 1 or block.hash is not None:
                if self.pool.num_free < 1:
                    return False
                private = self.pool.allocate()
                if self.storage is not None:
                    self.storage.copy_block(block.block_id, private.block_id)
                self.pool.release(block)
                seq.block_table[i] = private.block_id
        seq.num_computed_tokens = num_tokens
        del seq.block_hashes[i:]
        return True

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's blocks, last block first so a prefix outlives its tail in the LRU."""
        for block_id in reversed(seq.block_table):
            self.pool.release(self.pool.blocks[block_id])
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    # -- moving KV as bytes -----------------------------------------------------------------------

    def slots(self, seq: Sequence, begin: int, end: int) -> torch.Tensor:
        """Storage slots of token positions [begin, end) of `seq`."""
        bs = self.block_size
        if not 0 <= begin <= end <= len(seq.block_table) * bs:
            raise ValueError(f"token range [{begin}, {end}) is outside {seq.request_id}'s blocks")
        positions = torch.arange(begin, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[positions // bs] * bs + positions % bs

    def export_kv(self, seq: Sequence, begin: int, end: int) -> memoryview:
        """The KV of tokens [begin, end) of `seq` as a self-describing payload."""
        if self.storage is None:
            raise RuntimeError("this KV cache has no storage to export from")
        if end > seq.num_computed_tokens:
            raise ValueError(f"tokens up to {end} requested but only {seq.num_computed_tokens} are computed")
        return self.storage.export(self.slots(seq, begin, end), begin, end, seq.token_ids[begin:end])

    def parse(self, payload: bytes | memoryview) -> KVPayload:
        """Validate a payload against this cache's layout (format, compatibility, checksum)."""
        if self.storage is None:
            raise RuntimeError("this KV cache has no storage to import into")
        return parse_payload(payload, self.storage.layout)

    def import_kv(self, seq: Sequence, payload: bytes | memoryview | KVPayload) -> tuple[int, int]:
        """Write a payload into the blocks `seq` reserved for its token range; returns (begin, end).

        The caller commits the tokens with `append` once every range it expects has arrived.
        """
        parsed = payload if isinstance(payload, KVPayload) else self.parse(payload)
        assert self.storage is not None
        if parsed.begin < seq.num_computed_tokens:
            # Those blocks may be shared prefix-cache blocks: never overwrite computed KV.
            raise KVPayloadError(
                f"payload starts at token {parsed.begin}, before the {seq.num_computed_tokens} already held"
            )
        if parsed.end > seq.num_tokens:
            raise KVPayloadError(f"payload tokens [{parsed.begin}, {parsed.end}) exceed the prompt")
        if parsed.tokens_hash != tokens_hash(seq.token_ids[parsed.begin : parsed.end]):
            raise KVPayloadError("KV payload is for different tokens than this request's prompt")
        try:
            slots = self.slots(seq, parsed.begin, parsed.end)
        except ValueError as exc:
            raise KVPayloadError(str(exc)) from None
        self.storage.import_(slots, parsed)
        return parsed.begin, parsed.end
