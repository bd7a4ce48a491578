"""Continuous batching under a per-step token budget.

Each step the scheduler hands out `{sequence: new tokens}`: running sequences first (one decode token, or
the next chunk of a long prefill), then waiting ones FCFS. When blocks run out the latest running
sequence is preempted by recompute: its blocks are freed (its full blocks stay in the prefix cache, so
the recompute is mostly cache hits) and it goes back to the front of the queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from microserve.engine.kv_cache import KVCacheManager
from microserve.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")


@dataclass(slots=True)
class ScheduledBatch:
    """The only thing that crosses from scheduler to runner: sequences and how many new tokens each."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue `seq` behind every waiting sequence of its priority or a more urgent one (FCFS within a
        priority); sequences put back by preemption keep their place at the front."""
        priority, waiting = seq.params.priority, self.waiting
        if waiting and waiting[-1].params.priority > priority:
            for i, other in enumerate(waiting):
                if other.params.priority > priority and not other.num_preemptions:
                    waiting.insert(i, seq)
                    return
        waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.add(seq, n)
                budget -= n
                i += 1

        # Admitting new work while others were just preempted would only thrash the cache.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # A sequence that arrives holding KV (received from another engine) starts from it.
            # Prompt logprobs need every prompt position's logits: such a request skips the prefix cache.
            skip_cache = seq.block_table or seq.params.prompt_logprobs is not None
            cached = [] if skip_cache else self.kv.match_prefix(seq.token_ids)
            hit = len(cached) * self.kv.block_size
            n = min(seq.num_tokens - seq.num_computed_tokens - hit, budget)
            if not self.kv.allocate(seq, n, cached):
                break
            if seq.num_preemptions == 0 and not seq.num_cached_tokens:
                seq.num_cached_tokens = hit
                self.kv.record_admission(seq.num_prompt_tokens, hit)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Take a sequence out of the scheduler and free its blocks at once."""
        seq.status = status
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
