"""The engine core's KV verbs in process, on the sim backend: prep_recv, import_kv, release, the rewind
at start_generate and the expiry of a reservation, checked down to the block ids each takes and gives back."""

from __future__ import annotations

import pytest

from microserve.engine.config import CacheConfig
from microserve.engine.core import EngineCore
from microserve.engine.errors import EngineOverloaded
from microserve.engine.kv_storage import KVPayloadError
from microserve.engine.outputs import KVPiece, PrefillProgress, RequestOutput
from microserve.engine.reservations import ReservationError, ReservationQuotaExceeded
from microserve.engine.sampling import SamplingParams
from microserve.engine.scheduler import SchedulerConfig
from tests.conftest import make_core

BLOCK = 16
NUM_BLOCKS = 10
PROMPT = [100 + i for i in range(40)]  # two full blocks and 8 tokens


def sim_core() -> EngineCore:
    """A sim engine with 10 blocks of 16 tokens that prefills 16 tokens a step (so KV comes in pieces)."""
    return make_core(
        backend="sim",
        cache=CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=BLOCK),
        max_model_len=NUM_BLOCKS * BLOCK,
    )


def prefill(core: EngineCore, request_id: str, prompt: list[int]) -> list[KVPiece]:
    core.add_prefill(request_id, prompt, begin=0)
    pieces: list[KVPiece] = []
    while core.has_work():
        for out in core.step():
            assert isinstance(out, PrefillProgress)
            pieces += out.payloads
    return pieces


def finish(core: EngineCore) -> list[RequestOutput]:
    outputs = []
    while core.has_work():
        outputs += [out for out in core.step() if isinstance(out, RequestOutput)]
    return outputs


@pytest.fixture(scope="module")
def pieces() -> list[KVPiece]:
    """PROMPT's KV, exported by a sender engine one chunk at a time."""
    sender = sim_core()
    exported = prefill(sender, "sent", PROMPT)
    # The sender keeps the two full blocks in its prefix cache and frees the partial one.
    assert sender.kv.pool.num_cached == 2 and sender.kv.num_free_blocks == NUM_BLOCKS
    return exported


def test_the_prefill_exports_its_kv_as_it_is_computed(pieces: list[KVPiece]) -> None:
    assert [(p.begin, p.end) for p in pieces] == [(0, 16), (16, 32), (32, 40)]


def test_a_migrated_context_stays_in_the_prefix_cache_and_start_generate_rewinds_into_it(
    pieces: list[KVPiece],
) -> None:
    core = sim_core()
    # prep_recv: nothing cached here, so three fresh blocks are reserved, in the pool's order.
    assert core.prep_recv("a", PROMPT, end=40) == 0
    held = core.reservations.get("a")
    assert held.seq.block_table == [0, 1, 2] and core.kv.num_free_blocks == NUM_BLOCKS - 3

    # KV must arrive without gaps; a refused piece changes nothing.
    with pytest.raises(KVPayloadError, match=r"tokens \[0, 16\) is missing"):
        core.import_kv("a", pieces[1].data)
    assert held.received_upto == 0
    assert core.import_kv("a", pieces[0].data) == (0, 16)
    assert core.import_kv("a", pieces[1].data) == (16, 32)
    assert held.received_upto == 32

    # release: the two full blocks received stay cached (evictable), the tail block is freed at once.
    assert core.release("a") is True and core.release("a") is False
    assert core.kv.num_free_blocks == NUM_BLOCKS and core.kv.pool.num_cached == 2
    assert [b.block_id for b in core.kv.pool.blocks if b.hash is not None] == [0, 1]

    # The same context again: 32 tokens match blocks 0 and 1; the tail takes the next never-cached block.
    assert core.prep_recv("b", PROMPT, end=40) == 32
    held = core.reservations.get("b")
    assert held.seq.block_table == [0, 1, 3] and held.seq.num_computed_tokens == 32
    with pytest.raises(KVPayloadError, match="before the 32 already held"):
        core.import_kv("b", pieces[1].data)  # never overwrite shared prefix blocks
    assert core.import_kv("b", pieces[2].data) == (32, 40)

    # start_generate from token 20: block 1 is shared with the prefix cache, so it is copied (block 4)
    # before tokens 20.. are computed again; block 1 stays cached for the next request.
    with pytest.raises(ReservationError, match="differs"):
        core.add_request("b", [7, *PROMPT[1:]], SamplingParams(max_tokens=2), begin=20)
    core.add_request("b", PROMPT, SamplingParams(max_tokens=2, ignore_eos=True), begin=20)
    seq = core.requests["b"].seq
    assert seq.block_table == [0, 4, 3] and seq.num_computed_tokens == 20 and seq.num_cached_tokens == 20
    assert core.kv.pool.blocks[1].hash is not None and core.kv.pool.blocks[1].ref_count == 0

    outputs = finish(core)
    last = outputs[-1]
    assert last.finished and last.completion_tokens == 2 and last.cached_tokens == 20
    # Nothing leaked: every block free (or cached and evictable), no reservation left.
    assert core.kv.num_free_blocks == NUM_BLOCKS and len(core.reservations) == 0


def test_start_generate_past_the_received_kv_is_refused(pieces: list[KVPiece]) -> None:
    core = sim_core()
    core.prep_recv("a", PROMPT, end=40)
    core.import_kv("a", pieces[0].data)
    with pytest.raises(ReservationError, match=r"tokens \[16, 40\) never arrived"):
        core.add_request("a", PROMPT, SamplingParams(max_tokens=1), begin=40)
    assert core.release("a") and core.kv.num_free_blocks == NUM_BLOCKS


def test_a_reservation_nobody_starts_expires_and_gives_its_blocks_back(pieces: list[KVPiece]) -> None:
    core = sim_core()
    core.prep_recv("a", PROMPT, end=40)
    core.import_kv("a", pieces[0].data)
    deadline = core.reservations.next_deadline()
    assert deadline is not None
    assert core.expire_reservations(now=deadline - 1) == []
    assert core.expire_reservations(now=deadline + 1) == ["a"]
    assert core.kv.num_free_blocks == NUM_BLOCKS and core.kv.pool.num_cached == 1  # the one whole block


def test_prep_recv_beyond_the_free_blocks_is_refused_and_holds_nothing() -> None:
    core = sim_core()
    prompt = [5] * (NUM_BLOCKS * BLOCK)
    assert core.prep_recv("big", prompt, end=8 * BLOCK) == 0
    with pytest.raises(EngineOverloaded, match="no free KV blocks"):
        core.prep_recv("more", [6] * (3 * BLOCK), end=3 * BLOCK)
    assert "more" not in core.reservations and core.kv.num_free_blocks == 2
    assert core.release("big") and core.kv.num_free_blocks == NUM_BLOCKS


def test_one_requester_holds_at_most_its_share_of_the_cache() -> None:
    # Half of 10 blocks (a whole 4-block context is less): 5 blocks in reservations per requester.
    core = make_core(
        backend="sim",
        cache=CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS),
        max_model_len=4 * BLOCK,
        reservation_share=0.5,
    )
    assert core.prep_recv("a", [7] * (3 * BLOCK), end=3 * BLOCK, requester="10.0.0.1") == 0
    with pytest.raises(ReservationQuotaExceeded, match="limit of 5"):
        core.prep_recv("b", [8] * (3 * BLOCK), end=3 * BLOCK, requester="10.0.0.1")
    assert "b" not in core.reservations and core.kv.num_free_blocks == NUM_BLOCKS - 3  # b took nothing
    assert core.prep_recv("c", [9] * (3 * BLOCK), end=3 * BLOCK, requester="10.0.0.2") == 0
    assert core.release("a") and core.reservations.held_by("10.0.0.1") == 0
    assert core.prep_recv("b", [8] * (3 * BLOCK), end=3 * BLOCK, requester="10.0.0.1") == 0
    assert core.release("b") and core.release("c") and core.kv.num_free_blocks == NUM_BLOCKS


def test_a_choice_index_request_samples_as_that_choice_of_an_n_request() -> None:
    core = sim_core()
    core.add_request("n", PROMPT[:20], SamplingParams(max_tokens=6, n=3, ignore_eos=True, seed=3))
    tokens: dict[int, list[int]] = {}
    for out in finish(core):
        tokens.setdefault(out.index, []).extend(out.token_ids)
    assert len({tuple(t) for t in tokens.values()}) == 3  # each choice its own words
    # choice 2 continued from its second token, as the router does after an engine died
    params = SamplingParams(max_tokens=4, ignore_eos=True, seed=3, choice_index=2, num_prior_output_tokens=2)
    core.add_request("c", PROMPT[:20] + tokens[2][:2], params)
    rest = [t for out in finish(core) for t in out.token_ids]
    assert rest == tokens[2][2:]
    with pytest.raises(ValueError, match="choice_index"):
        core.add_request("bad", PROMPT[:20], SamplingParams(max_tokens=2, n=2, choice_index=1))
