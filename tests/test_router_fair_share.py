"""The admission queue's order: priority classes strictly first, then start-time fair queuing on tokens
between tenants (FIFO for one tenant); exact tags, then the queue itself granting slots in that order."""

from __future__ import annotations

import asyncio

import pytest

from microserve.router.admission import AdmissionConfig, AdmissionQueue
from microserve.router.fair_share import FairShare, admit, admit_now
from microserve.server.errors import APIError


def test_one_tenant_is_fifo() -> None:
    fair = FairShare()
    orders = [fair.arrive("a", 1, 10) for _ in range(3)]
    assert orders == [(1, 0.0), (1, 10.0), (1, 20.0)]


def test_a_quiet_tenant_goes_before_a_noisy_backlog() -> None:
    fair = FairShare()
    noisy = [fair.arrive("noisy", 1, 100) for _ in range(10)]
    fair.admitted(noisy[0])
    quiet = fair.arrive("quiet", 1, 100)
    assert quiet == (1, 0.0) and sorted([*noisy[1:], quiet])[0] == quiet
    second_quiet = fair.arrive("quiet", 1, 100)
    assert second_quiet == noisy[1]  # then the two alternate: equal shares of tokens


def test_an_idle_tenant_banks_no_credit() -> None:
    fair = FairShare()
    for _ in range(5):
        fair.admitted(fair.arrive("busy", 1, 100))
    assert fair.virtual == 400.0
    assert fair.arrive("back", 1, 100) == (1, 400.0)  # starts at virtual time, not at 0


def test_priority_classes_come_first_and_fifo_when_disabled() -> None:
    fair = FairShare()
    low = fair.arrive("a", 2, 1)
    high = fair.arrive("b", 0, 1000)
    assert high < low
    fifo = FairShare(enabled=False)  # one order per class: the queue serves ties in arrival order
    noisy = [fifo.arrive("noisy", 1, 100) for _ in range(3)]
    assert fifo.arrive("quiet", 1, 100) == noisy[-1]
    assert fifo.arrive("quiet", 0, 100) < noisy[-1]


async def test_disabled_fair_share_is_fifo_within_a_class_through_the_queue() -> None:
    queue, fair = AdmissionQueue(AdmissionConfig(max_concurrent=1)), FairShare(enabled=False)
    held = await admit(fair, queue, "noisy", 1, 10, 10.0)
    granted: list[str] = []

    async def one(name: str, tenant: str, rank: int) -> None:
        ticket = await admit(fair, queue, tenant, rank, 10, 10.0)
        granted.append(name)
        queue.release(ticket)

    tasks = []
    for name, tenant, rank in [("n1", "noisy", 1), ("n2", "noisy", 1), ("q", "quiet", 1), ("hi", "x", 0)]:
        tasks.append(asyncio.create_task(one(name, tenant, rank)))
        await asyncio.sleep(0)  # each queues before the next arrives
    queue.release(held)
    await asyncio.gather(*tasks)
    assert granted == ["hi", "n1", "n2", "q"]  # the higher class first, then arrival order


async def test_the_admission_queue_grants_in_that_order() -> None:
    queue, fair = AdmissionQueue(AdmissionConfig(max_concurrent=1)), FairShare()
    first = fair.arrive("noisy", 1, 10)
    await queue.acquire(first)
    fair.admitted(first)
    granted: list[str] = []

    async def one(name: str, tenant: str, rank: int) -> None:
        order = fair.arrive(tenant, rank, 10)
        await queue.acquire(order)
        fair.admitted(order)
        granted.append(name)
        queue.release()

    tasks = [asyncio.create_task(one(f"noisy{i}", "noisy", 1)) for i in range(4)]
    tasks.append(asyncio.create_task(one("low", "other", 2)))
    tasks.append(asyncio.create_task(one("quiet", "quiet", 1)))
    tasks.append(asyncio.create_task(one("high", "vip", 0)))
    while queue.queued < 7:
        await asyncio.sleep(0)
    queue.release()
    await asyncio.gather(*tasks)
    assert granted == ["high", "quiet", "noisy0", "noisy1", "noisy2", "noisy3", "low"]


def test_a_tenant_below_its_share_of_slots_overtakes() -> None:
    fair = FairShare()
    fair.running("noisy", 4)
    fair.waiting("noisy", 3)
    fair.waiting("quiet", 1)
    assert fair.below_share("quiet", 4)  # holds 0 of its 2
    assert not fair.below_share("noisy", 4)
    fair.running("quiet", 2)
    assert not fair.below_share("quiet", 4)
    assert not fair.below_share("third", 2)  # 2 slots over 3 tenants: no share to overtake for
    fifo = FairShare(enabled=False)
    fifo.running("noisy", 4)
    assert not fifo.below_share("quiet", 4)  # one tenant for FIFO: nobody overtakes


async def test_over_the_limit_the_queue_refills_only_below_it() -> None:
    queue = AdmissionQueue(AdmissionConfig(max_concurrent=2))
    await queue.acquire()
    await queue.acquire()
    assert queue.admit_now() is not None and queue.admit_now() is not None  # up to twice the limit
    assert queue.admit_now() is None
    waiter = asyncio.create_task(queue.acquire())
    while not queue.queued:
        await asyncio.sleep(0)
    queue.release()
    queue.release()  # 4 -> 2 running: not below the limit, the waiter stays
    await asyncio.sleep(0)
    assert not waiter.done() and queue.running == 2
    queue.release()  # below the limit now: the slot goes to the waiter
    await waiter
    assert queue.running == 2


async def test_a_full_queue_sheds_the_last_in_line_for_a_better_placed_request() -> None:
    queue, fair = AdmissionQueue(AdmissionConfig(max_concurrent=1, max_queued=2)), FairShare()
    await queue.acquire()
    noisy = [asyncio.create_task(queue.acquire(fair.arrive("noisy", 1, 10))) for _ in range(2)]
    while queue.queued < 2:
        await asyncio.sleep(0)
    with pytest.raises(APIError, match="at capacity"):
        await queue.acquire(fair.arrive("noisy", 1, 10))  # last in line itself: refused
    quiet = asyncio.create_task(queue.acquire(fair.arrive("quiet", 1, 10)))
    with pytest.raises(APIError, match="last in line"):
        await noisy[1]  # the noisy backlog's tail made room
    queue.release()
    await noisy[0]  # the same start tag as the quiet request's, and earlier
    queue.release()
    await quiet


def test_a_refused_request_gives_its_tag_back() -> None:
    fair = FairShare()
    first = fair.arrive("t", 1, 10)
    refused = fair.arrive("t", 1, 10)
    fair.withdraw("t", refused, 10)
    assert fair.arrive("t", 1, 10) == refused  # as if the refused one had never come
    fair.withdraw("t", first, 10)  # not the latest: nothing to give back
    assert fair.arrive("t", 1, 10) == (1, 20.0)


async def test_admit_overtakes_below_the_share_and_withdraws_a_refusal() -> None:
    queue, fair = AdmissionQueue(AdmissionConfig(max_concurrent=2, max_queued=0)), FairShare()
    for _ in range(2):
        await admit(fair, queue, "noisy", 1, 10, 5.0)
    assert queue.running == 2
    await admit(fair, queue, "quiet", 1, 10, 5.0)  # below its share of one slot: at once
    assert queue.running == 3
    with pytest.raises(APIError):
        await admit(fair, queue, "noisy", 1, 10, 5.0)  # at its share, and nowhere to queue
    assert fair.arrive("noisy", 1, 10) == (1, 20.0)  # the refusal took nothing


async def test_admit_now_takes_a_free_slot_as_admit_would_and_never_waits() -> None:
    now, later = (
        AdmissionQueue(AdmissionConfig(max_concurrent=2)),
        AdmissionQueue(AdmissionConfig(max_concurrent=2)),
    )
    fair_now, fair_later = FairShare(), FairShare()
    for tenant, cost in (("a", 10), ("b", 30)):
        assert admit_now(fair_now, now, tenant, 1, cost) is not None
        await admit(fair_later, later, tenant, 1, cost, 5.0)
    # the same bookkeeping either way: tags, virtual time, running counts, recent service
    assert fair_now.arrive("a", 1, 5) == fair_later.arrive("a", 1, 5) == (1, 10.0)
    assert fair_now.virtual == fair_later.virtual
    assert fair_now.below_share("c", 4) == fair_later.below_share("c", 4)
    assert fair_now.owed("a", 4, now=0.0) == fair_later.owed("a", 4, now=0.0)
    assert now.running == 2 and admit_now(fair_now, now, "c", 1, 10) is None  # full: None, no wait
    assert now.running == 2 and fair_now.arrive("c", 1, 10) == (1, fair_now.virtual)  # nothing kept
    off = FairShare(enabled=False)
    queue = AdmissionQueue(AdmissionConfig(max_concurrent=1))
    ticket = admit_now(off, queue, "", 1, 0)
    assert ticket is not None and admit_now(off, queue, "", 1, 0) is None
    queue.release(ticket)
    assert queue.running == 0


def test_a_tenant_served_less_than_an_equal_share_is_owed_service() -> None:
    fair = FairShare(half_life_s=10.0)
    fair.running("noisy", 4)
    fair.waiting("noisy", 2)
    for _ in range(4):
        fair.served("noisy", 100, now=0.0)
    fair.served("quiet", 100, now=0.0)
    fair.waiting("quiet", 1)  # (the request asking counts as waiting)
    assert fair.owed("quiet", 4, now=1.0)  # 100 of 500 tokens lately, an equal share is 250
    assert not fair.owed("quiet", 1, now=1.0)  # one slot for two tenants: nobody goes past the limit
    assert not fair.owed("noisy", 4, now=1.0)  # backlogged itself
    fair.waiting("quiet", 1)  # a second quiet request waiting: it is backlogged
    assert not fair.owed("quiet", 4, now=1.0)
    fair.waiting("quiet", -1)
    fair.refused("quiet", now=2.0)  # refused a slot lately: it asks for more than it gets
    assert not fair.owed("quiet", 4, now=2.5) and fair.owed("quiet", 4, now=3.5)
    fair.waiting("noisy", -2)
    assert not fair.owed("quiet", 4, now=3.5)  # nobody backlogged: nothing to go past
    fair.refused("noisy", now=3.5)
    assert fair.owed("quiet", 4, now=3.5)  # the noisy tenant is refused: backlogged again
    for _ in range(5):
        fair.served("quiet", 100, now=4.0)
    assert not fair.owed("quiet", 4, now=4.0)  # now served more than the noisy tenant lately
    alone = FairShare()
    alone.waiting("solo", 1)
    assert not alone.owed("solo", 4, now=0.0)  # nobody to compete with
    assert not FairShare(enabled=False).owed("quiet", 4, now=0.0)


async def test_admit_lets_an_owed_tenant_past_a_full_share_of_slots() -> None:
    queue, fair = AdmissionQueue(AdmissionConfig(max_concurrent=2)), FairShare()
    for _ in range(2):
        await admit(fair, queue, "noisy", 1, 10, 5.0)
    waiting = asyncio.ensure_future(admit(fair, queue, "noisy", 1, 10, 5.0))
    await asyncio.sleep(0)
    assert queue.queued == 1
    await admit(fair, queue, "quiet", 1, 10, 5.0)  # below its one-slot share: at once
    assert queue.running == 3
    # Now at its share of slots, but served 10 tokens to the noisy tenant's 20: owed, so it starts now
    # instead of behind the slot the noisy tenant waits for.
    await admit(fair, queue, "quiet", 1, 10, 5.0)
    assert queue.running == 4 and queue.queued == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_nobody_overtakes_a_more_urgent_class() -> None:
    queue, fair = AdmissionQueue(AdmissionConfig(max_concurrent=2)), FairShare()
    for _ in range(2):
        await admit(fair, queue, "busy", 0, 10, 5.0)
    urgent = asyncio.ensure_future(admit(fair, queue, "busy", 0, 10, 5.0))
    await asyncio.sleep(0)
    # Below its share of slots, but a high-priority request waits: the low one queues behind it.
    low = asyncio.ensure_future(admit(fair, queue, "batch", 2, 10, 5.0))
    await asyncio.sleep(0)
    assert queue.running == 2 and queue.queued == 2
    for task in (urgent, low):
        task.cancel()
    await asyncio.gather(urgent, low, return_exceptions=True)
