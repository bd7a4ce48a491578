"""The sim runner: its clock, its tokens (by content, seeded), the real scheduler over it, its storage."""

from __future__ import annotations

import pytest

from microserve.engine.kv_cache import KVCacheManager
from microserve.engine.kv_storage import KVStorage
from microserve.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from microserve.runner.sim_runner import SimRunner, plain_word_tokens
from tests.runner_fakes import COST, WORDS, FakeClock, make_seq


def test_execute_waits_for_the_modelled_time_through_the_clock():
    clock = FakeClock()
    runner = SimRunner(COST, WORDS, clock=clock)
    for n in (4, 6):
        batch = ScheduledBatch()
        batch.add(make_seq(list(range(10)), computed=10 - n), n)
        runner.execute(batch)
    assert clock.waits == [COST.step_time([(6, 4)]), COST.step_time([(4, 6)])]
    assert runner.modelled_time_s == sum(clock.waits)


def test_execute_returns_none_for_chunks_that_do_not_reach_the_end():
    runner = SimRunner(COST, WORDS, clock=FakeClock())
    batch = ScheduledBatch()
    batch.add(make_seq(list(range(10))), 4)
    batch.add(make_seq(list(range(10)), computed=4), 6)
    out = runner.execute(batch)
    assert out[0] is None
    assert out[1] in WORDS


def test_tokens_depend_on_content_not_on_batch_or_runner():
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [5, 5, 5, 5, 5, 5]]
    alone = []
    for i, p in enumerate(prompts):
        batch = ScheduledBatch()
        batch.add(make_seq(p, rid=f"a{i}"), len(p))
        alone += SimRunner(COST, WORDS, clock=FakeClock()).execute(batch)
    together = ScheduledBatch()
    for i, p in reversed(list(enumerate(prompts))):
        seq = make_seq(p, computed=len(p) - 1, rid=f"b{i}")  # the same content reached as a decode step
        together.add(seq, 1)
    assert SimRunner(COST, WORDS, clock=FakeClock()).execute(together) == alone[::-1]


def test_seeds_change_the_tokens():
    seqs = [make_seq([i, i + 1, i + 2]) for i in range(20)]

    def tokens(runner_seed: int = 0, request_seed: int | None = None) -> list[int]:
        runner = SimRunner(COST, WORDS, seed=runner_seed)
        return [runner.token_for(make_seq(s.token_ids, seed=request_seed)) for s in seqs]

    assert tokens() == tokens()
    assert tokens(runner_seed=1) != tokens()
    assert tokens(request_seed=7) != tokens()


def test_sim_runner_drives_the_real_scheduler_and_chunking_does_not_change_the_output():
    def generate(budget: int) -> dict[str, list[int]]:
        runner = SimRunner(COST, WORDS, clock=FakeClock(), block_size=4)
        kv = KVCacheManager(num_blocks=64, block_size=4)
        runner.bind(KVStorage(SimRunner.storage_layout(4), 64))
        sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget), kv)
        seqs = [make_seq(list(range(i, i + 13)), rid=f"r{i}") for i in range(3)]
        for seq in seqs:
            sched.add(seq)
        while sched.has_work():
            batch = sched.schedule()
            for seq, n, token in zip(batch.seqs, batch.num_new_tokens, runner.execute(batch), strict=True):
                kv.append(seq, n)
                if token is not None:
                    seq.token_ids.append(token)
                    if seq.num_completion_tokens == 5:
                        sched.finish(seq, seq.status.FINISHED_LENGTH)
        assert kv.num_free_blocks == kv.num_blocks
        return {s.request_id: s.completion_token_ids for s in seqs}

    assert generate(budget=5) == generate(budget=512)


def test_storage_layout_is_tiny_and_bind_adopts_the_storage():
    layout = SimRunner.storage_layout(32)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size) == (1, 1, 1, 32)
    assert layout.bytes_per_token == 8
    runner = SimRunner(COST, WORDS)
    assert runner.layout == SimRunner.storage_layout(16)
    storage = KVStorage(layout, 4)
    runner.bind(storage)
    assert runner.storage is storage and runner.layout == layout


def test_sim_runner_needs_words():
    with pytest.raises(ValueError):
        SimRunner(COST, [])


class FakeTokenizer:
    texts = [" the", "<s>", " a", " Hello", "ing", " x9", " toolongword", " café", " the", " World", "  ab"]

    @property
    def vocab_size(self) -> int:
        return len(self.texts)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.texts[i] for i in ids)


def test_plain_word_tokens_keeps_a_space_and_two_to_eight_ascii_letters():
    assert plain_word_tokens(FakeTokenizer()) == [0, 3, 9]  # id 8 repeats " the"
    assert plain_word_tokens(FakeTokenizer(), limit=2) == [0, 3]


def test_plain_word_tokens_fails_without_words():
    class Empty(FakeTokenizer):
        texts = ["<s>", "x"]

    with pytest.raises(ValueError, match="plain word"):
        plain_word_tokens(Empty())
