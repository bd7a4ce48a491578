"""The admission queue's order: priority classes strictly first, then start-time fair queuing on tokens
between tenants (FIFO for one tenant); exact tags, then the queue itself granting slots in that order."""

from __future__ import annotations

import asyncio

from microserve.router.admission import AdmissionConfig, AdmissionQueue
from microserve.router.fair_share import FairShare


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
    fifo = FairShare(enabled=False)
    noisy = [fifo.arrive("noisy", 1, 100) for _ in range(3)]
    assert fifo.arrive("quiet", 1, 100) > noisy[-1]


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
