"""The sim runner: waits for a step's modelled time instead of computing it, and emits deterministic tokens.

Behind the real scheduler and KV cache it lets one machine host many engines, for routing tests and benches.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
import xxhash

from microserve.engine.grammar import GrammarMatcher
from microserve.engine.kv_storage import KVLayout, KVStorage
from microserve.engine.outputs import TokenLogprobs
from microserve.engine.scheduler import ScheduledBatch
from microserve.engine.sequence import Sequence
from microserve.runner.cost_model import CostModel

_PLAIN_WORD = re.compile(r" [A-Za-z]{2,8}")


class SimRunner:
    """A Runner whose `execute` sleeps (through `clock`) for `cost_model.step_time_for(batch)`.

    A token depends only on the sequence's content (the runner seed, the request seed, its length and
    last tokens), never on what it was batched with or which engine ran it, so the same prompt gives
    the same output across a fleet of sim engines and after a migration. The words never include EOS:
    a sim request always runs to its max_tokens (or a stop string), which keeps benchmark loads exact.
    """

    def __init__(
        self,
        cost_model: CostModel,
        vocab_words: list[int],
        *,
        seed: int = 0,
        clock: Callable[[float], None] = time.sleep,
        block_size: int = 16,
    ) -> None:
        if not vocab_words:
            raise ValueError("the sim runner needs at least one token id to emit")
        self.cost_model = cost_model
        self.vocab_words = list(vocab_words)
        self.seed = seed
        self.clock = clock
        self.layout = self.storage_layout(block_size)
        self.storage: KVStorage | None = None
        self.modelled_time_s = 0.0  # total the runner has waited: its "busy" time

    @staticmethod
    def storage_layout(block_size: int) -> KVLayout:
        """The tiny layout a sim engine stores: real export/import of its blocks at 8 bytes a token.

        Capacity (how many blocks fit) is modelled on the real model's layout by the builder instead.
        """
        return KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, block_size=block_size, dtype="float32")

    def bind(self, storage: KVStorage) -> None:
        self.storage = storage
        self.layout = storage.layout  # the storage decides; the builder sizes it for its block size

    def forget(self, request_id: str) -> None:
        pass  # tokens depend on the sequence alone: there is no per-request state to drop

    def transfer_time(self, num_tokens: int) -> float:
        """The modelled time to move the real model's KV for `num_tokens` (the payload sent is tiny)."""
        return self.cost_model.kv_transfer_time(num_tokens)

    def execute(self, batch: ScheduledBatch) -> list[int | None]:
        """Wait for the batch's modelled time; a token for each sequence whose new tokens reach its end."""
        seconds = self.cost_model.step_time_for(batch)
        self.clock(seconds)
        self.modelled_time_s += seconds
        return [
            self.token_for(seq) if seq.samples_after(n) else None
            for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
        ]

    def token_for(self, seq: Sequence) -> int:
        """The next token of `seq`: a hash of its content ranks `vocab_words`; the first one that
        `logit_bias` does not ban (-100) is the token, unless a positive bias forces another.

        With logprobs asked, the k words ranked first carry made-up logprobs, falling with the rank."""
        p = seq.params
        tail = ",".join(map(str, seq.token_ids[-4:]))
        choice = f"{seq.index}:" if seq.index else ""  # n > 1: each choice its own words
        key = f"{self.seed}:{p.seed}:{choice}{len(seq.token_ids)}:{tail}".encode()
        start = xxhash.xxh3_64_intdigest(key) % len(self.vocab_words)
        ranked = self.vocab_words[start:] + self.vocab_words[:start]
        if p.logit_bias:
            favoured = sorted((-b, t) for t, b in p.logit_bias.items() if b > 0)
            ranked = [t for _, t in favoured] + [t for t in ranked if p.logit_bias.get(t, 0.0) == 0.0]
        token = ranked[0] if seq.grammar is None else _allowed_first(seq.grammar, ranked)
        if p.prompt_logprobs is not None and not seq.prompt_logprobs:
            # Made up too: each prompt token as likely as the sim's own first choice.
            seq.prompt_logprobs = [None] + [
                TokenLogprobs(t, -0.5, [(t, -0.5)][: p.prompt_logprobs])
                for t in seq.token_ids[1 : seq.num_prompt_tokens]
            ]
        if p.logprobs is not None:
            top = [(t, -0.5 * (rank + 1)) for rank, t in enumerate(ranked[: p.logprobs])]
            seq.logprobs.append(TokenLogprobs(token, -0.5, top))
        return token


def _allowed_first(grammar: GrammarMatcher, ranked: list[int]) -> int:
    """Structured output on the sim: the first ranked word the grammar allows, else its lowest token."""
    mask = np.empty(grammar.words, dtype=np.int32)
    grammar.fill_bitmask(mask)
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")
    for token in ranked:
        if token < allowed.size and allowed[token]:
            return token
    return int(np.flatnonzero(allowed)[0])


class _Vocabulary(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def decode(self, ids: list[int]) -> str: ...


def plain_word_tokens(tokenizer: _Vocabulary, limit: int = 512) -> list[int]:
    """Up to `limit` token ids whose text is a space and 2-8 ASCII letters, lowest ids (commonest) first.

    The sim's output then reads as a stream of words. Ids whose text repeats an earlier one are skipped.
    """
    words: list[int] = []
    seen: set[str] = set()
    for token_id in range(tokenizer.vocab_size):
        text = tokenizer.decode([token_id])
        if text in seen or not _PLAIN_WORD.fullmatch(text):
            continue
        seen.add(text)
        words.append(token_id)
        if len(words) >= limit:
            break
    if not words:
        raise ValueError("the tokenizer has no token that decodes to a plain word")
    return words
