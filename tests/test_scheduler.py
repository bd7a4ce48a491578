"""Continuous batching: token budget, chunked prefill, prefix hits at admission, preemption by recompute."""

from microserve.engine.kv_cache import KVCacheManager
from microserve.engine.sampling import SamplingParams
from microserve.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from microserve.engine.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks: int = 64, budget: int = 16, max_seqs: int = 8) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), kv)


def seq(rid: str, n: int, start: int = 0) -> Sequence:
    return Sequence(rid, list(range(start, start + n)), SamplingParams(max_tokens=100))


def picks(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]


def run(s: Scheduler, batch: ScheduledBatch, token: int = 7) -> None:
    """What the engine core does after the model ran: commit, and append a token where one was sampled."""
    for q, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        s.kv.append(q, n)
        if q.num_computed_tokens == q.num_tokens:
            q.token_ids.append(token)


def test_budget_chunks_long_prefill_and_fcfs():
    s = make(budget=16)
    s.add(seq("a", 20))
    s.add(seq("b", 6, start=100))
    b1 = s.schedule()
    assert picks(b1) == [("a", 16)]  # a's prefill fills the whole budget
    run(s, b1)
    b2 = s.schedule()
    assert picks(b2) == [("a", 4), ("b", 6)]  # the rest of a's prompt, then b joins
    run(s, b2)
    b3 = s.schedule()
    assert picks(b3) == [("a", 1), ("b", 1)]  # both decoding
    assert [q.status for q in s.running] == [SequenceStatus.RUNNING] * 2


def test_max_num_seqs_caps_the_batch():
    s = make(budget=100, max_seqs=2)
    for r in "abc":
        s.add(seq(r, 3, start=ord(r) * 10))
    assert picks(s.schedule()) == [("a", 3), ("b", 3)]
    assert [q.request_id for q in s.waiting] == ["c"]


def test_prefix_hit_at_admission_skips_cached_tokens():
    s = make(budget=64)
    a = seq("a", 10)
    s.add(a)
    run(s, s.schedule())
    s.finish(a, SequenceStatus.FINISHED_STOPPED)
    b = seq("b", 13)  # shares a's first 8 tokens = 2 full blocks
    s.add(b)
    assert picks(s.schedule()) == [("b", 5)]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert s.kv.prefix_queries == 23 and s.kv.prefix_hits == 8


def test_preemption_by_recompute_frees_latest_and_requeues_it_first():
    # 4 blocks of 4 tokens; a and b each hold 2 blocks after prefill; the next decode needs a 3rd block.
    s = make(num_blocks=4, budget=64)
    a, b = seq("a", 8), seq("b", 8, start=50)
    s.add(a)
    s.add(b)
    run(s, s.schedule())
    assert s.kv.num_free_blocks == 0
    batch = s.schedule()
    assert picks(batch) == [("a", 1)]  # b was preempted to make room for a's new block
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert list(s.waiting) == [b] and s.num_preemptions == 1
    # a's new block evicted b's tail block; b's first block stayed cached and is reused on return.
    run(s, batch)
    s.finish(a, SequenceStatus.FINISHED_LENGTH)
    again = s.schedule()
    assert picks(again) == [("b", 5)] and b.num_computed_tokens == 4


def test_no_admission_in_a_step_that_preempted():
    s = make(num_blocks=4, budget=64)
    a, b = seq("a", 8), seq("b", 8, start=50)
    s.add(a)
    s.add(b)
    run(s, s.schedule())
    s.add(seq("c", 1, start=90))
    assert picks(s.schedule()) == [("a", 1)]
    assert [q.request_id for q in s.waiting] == ["b", "c"]


def test_finish_frees_blocks_of_waiting_and_running():
    s = make(num_blocks=8, budget=4)
    a, b = seq("a", 6), seq("b", 3, start=40)
    s.add(a)
    s.add(b)
    s.schedule()  # a gets the whole budget (4 tokens, one block); b waits
    s.finish(a, SequenceStatus.FINISHED_ABORTED)
    s.finish(b, SequenceStatus.FINISHED_ABORTED)
    assert not s.has_work()
    assert s.kv.num_free_blocks == 8


def test_waiting_sequences_are_admitted_by_priority_fcfs_within_one():
    s = make(budget=100, max_seqs=1)
    s.add(seq("running", 3))
    run(s, s.schedule())
    for rid, priority in (("low1", 1), ("normal1", 0), ("high", -1), ("low2", 1), ("normal2", 0)):
        q = seq(rid, 3, start=100)
        q.params.priority = priority
        s.add(q)
    assert [q.request_id for q in s.waiting] == ["high", "normal1", "normal2", "low1", "low2"]
    preempted = s.waiting.popleft()
    preempted.num_preemptions = 1
    s.waiting.appendleft(preempted)
    q = seq("higher", 3, start=200)
    q.params.priority = -2
    s.add(q)  # before every waiting one of a larger value, but behind a preempted one
    assert [q.request_id for q in s.waiting][:2] == ["high", "higher"]
