"""Admission sized to capacity, on the simulator's virtual clock (the same queue the router runs): the
limit follows the ready workers, a request that cannot start within its queue budget is refused at once
with a Retry-After from the drain rate, and while no worker is ready requests are held, then 503."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from microserve.processes import ManagedProcess, free_port
from microserve.router.admission import AdmissionConfig, AdmissionQueue, pool_capacity
from microserve.router.breaker import BreakerConfig
from microserve.router.config import RouterConfig
from microserve.router.health import HealthConfig
from microserve.router.router import Router
from microserve.router.workers import Role, WorkerPool, WorkerSpec
from microserve.server.errors import APIError
from microserve.simulator.clock import run_virtual
from tests.fleet import sim_engine, write_profile
from tests.router_fakes import serving


def test_capacity_is_the_ready_workers_batch_sizes() -> None:
    now = [0.0]
    pool = WorkerPool(BreakerConfig(open_s=5.0), clock=lambda: now[0])
    a, b, c = (pool.add(WorkerSpec(f"http://e{i}:1")) for i in range(3))
    a.report_load(0, 0, 0.0, max_num_seqs=8)
    b.report_load(0, 0, 0.0)  # reports no batch size (another server): the per-worker default
    c.report_load(0, 0, 0.0, max_num_seqs=32)
    assert pool_capacity(pool, per_worker=5) == 8 + 5 + 32
    c.healthy = False
    b.breaker.trip()
    assert pool_capacity(pool, per_worker=5) == 8
    now[0] = 5.0  # its open time is over: half-open, one trial request at a time
    assert pool_capacity(pool, per_worker=5) == 8 + 1
    a.draining = True
    b.healthy = False
    assert pool_capacity(pool, per_worker=5) == 0


def test_capacity_is_zero_while_a_role_the_strategy_needs_has_no_worker() -> None:
    pool = WorkerPool(BreakerConfig())
    prefill = pool.add(WorkerSpec("http://p:1", role=Role.PREFILL))
    pd = (Role.PREFILL, Role.DECODE)
    assert pool_capacity(pool, per_worker=4, roles=pd) == 0  # no decode worker: requests are held
    assert pool_capacity(pool, per_worker=4) == 4  # a strategy naming no roles counts every worker
    decode = pool.add(WorkerSpec("http://d:1", role=Role.DECODE))
    assert pool_capacity(pool, per_worker=4, roles=pd) == 8
    decode.draining = True  # a pool scaled down to zero
    assert pool_capacity(pool, per_worker=4, roles=pd) == 0
    prefill.draining = True
    pool.add(WorkerSpec("http://b:1"))  # a `both` worker does either
    assert pool_capacity(pool, per_worker=4, roles=pd) == 4


def test_a_request_that_cannot_start_in_its_budget_is_refused_at_once() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        config = AdmissionConfig(max_queue_wait_s=2.0, retry_after_s=7)
        queue = AdmissionQueue(config, capacity=lambda: 2, clock=loop.time)
        # Two requests of 1 s each: a slot frees every 0.5 s.
        grants = [await queue.acquire(), await queue.acquire()]
        await asyncio.sleep(1.0)
        for granted in grants:
            queue.release(granted)
        assert queue.service_s == pytest.approx(1.0)
        held = [await queue.acquire(), await queue.acquire()]
        # The two running started together, so they end together, in 1 s: both waiters are expected
        # to start then (not at 0.5 and 1.0 s, as the mean drain rate says), within half the budget
        # (the margin for slots that free in bursts).
        assert (queue.expected_wait_s(0), queue.expected_wait_s(1)) == (1.0, 1.0)
        waiters = [asyncio.create_task(queue.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        assert queue.queued == 2
        before = loop.time()
        with pytest.raises(APIError) as refused:
            await queue.acquire()  # a third would wait 1.5 s
        assert loop.time() == before  # refused at once, not after queueing
        assert refused.value.status == 429
        assert refused.value.headers == {"Retry-After": "2"}  # 3 ahead drain in 1.5 s
        # The queue drains as measured: each waiter starts within its budget.
        for granted in held:
            queue.release(granted)
        for task in waiters:
            queue.release(await task)
            assert loop.time() - before <= config.max_queue_wait_s

    run_virtual(main())


def test_waiters_go_by_priority_then_arrival() -> None:
    async def main() -> None:
        queue = AdmissionQueue(AdmissionConfig(max_concurrent=1))
        granted = await queue.acquire()
        order: list[str] = []

        async def wait(name: str, priority: tuple[int, float]) -> None:
            queue.release(await queue.acquire(priority))
            order.append(name)

        orders = (("late", (1, 0.0)), ("a", (0, 0.0)), ("b", (0, 0.0)))
        tasks = [asyncio.create_task(wait(n, p)) for n, p in orders]
        await asyncio.sleep(0)
        queue.release(granted)
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "late"]

    run_virtual(main())


def test_zero_ready_workers_hold_requests_until_one_is_ready() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ready = [0]
        queue = AdmissionQueue(AdmissionConfig(queue_timeout_s=30.0), lambda: ready[0], loop.time)
        held = [asyncio.create_task(queue.acquire()) for _ in range(3)]
        await asyncio.sleep(12.0)  # far past the 2 s queue budget: nobody is refused while none is ready
        assert queue.queued == 3 and not any(t.done() for t in held)
        ready[0] = 2  # an engine came up (no wake call: the waiters notice on their own)
        await asyncio.sleep(0.5)
        assert sum(t.done() for t in held) == 2 and queue.running == 2
        queue.release(held[0].result())
        await held[2]
        assert loop.time() == pytest.approx(12.5)

    run_virtual(main())


def test_held_requests_get_503_with_retry_after_when_no_worker_comes() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = AdmissionQueue(AdmissionConfig(queue_timeout_s=30.0, retry_after_s=4), lambda: 0, loop.time)
        short = asyncio.create_task(queue.acquire(timeout_s=5.0))  # its own deadline comes first
        with pytest.raises(APIError) as refused:
            await queue.acquire()
        assert loop.time() == pytest.approx(30.0)
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "4"}
        assert refused.value.code == "no_worker_available"
        with pytest.raises(APIError):
            await short
        assert queue.queued == 0 and queue.running == 0

    run_virtual(main())


# -- end to end: a router whose only engine is down, then starts -----------------------------------


@pytest.mark.slow
async def test_requests_wait_for_the_first_engine_then_get_their_answer(tmp_path: Path) -> None:
    port = free_port()
    workers = [WorkerSpec(f"http://127.0.0.1:{port}")]
    health = HealthConfig(interval_s=0.5, timeout_s=1.0)
    body = {"prompt": "Hello there", "max_tokens": 8}
    # No engine comes within the queue timeout: 503 with Retry-After once it passes, not before.
    quick = RouterConfig(workers=workers, health=health, admission=AdmissionConfig(queue_timeout_s=1.5))
    async with serving(Router(quick)) as client:
        started = time.monotonic()
        async with client.post("/v1/completions", json=body) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "no_worker_available"
        assert time.monotonic() - started >= 1.5
    # The engine starts while requests wait: every one is answered, none is lost.
    held = RouterConfig(workers=workers, health=health, admission=AdmissionConfig(queue_timeout_s=300))
    engine: ManagedProcess | None = None
    async with serving(Router(held)) as client:
        try:
            requests = [
                asyncio.create_task(client.post("/v1/completions", json={**body, "stream": i % 2 == 0}))
                for i in range(6)
            ]
            await asyncio.sleep(0.5)
            assert client.router.admission.queued == 6 and not any(r.done() for r in requests)
            engine = sim_engine(write_profile(tmp_path / "profile.json", 0.01), port=port)
            for resp in await asyncio.gather(*requests):
                assert resp.status == 200, await resp.text()
                text = await resp.text()
                assert "[DONE]" in text if resp.content_type == "text/event-stream" else "choices" in text
        finally:
            if engine is not None:
                engine.stop()


async def test_admission_runs_queues_in_order_and_refuses_beyond() -> None:
    queue = AdmissionQueue(
        AdmissionConfig(max_concurrent=1, max_queued=2, queue_timeout_s=5, retry_after_s=2)
    )
    await queue.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await queue.acquire()
        order.append(i)

    waiters = [asyncio.create_task(wait(i)) for i in range(2)]
    await asyncio.sleep(0)
    assert (queue.running, queue.queued) == (1, 2)
    with pytest.raises(APIError) as refused:
        await queue.acquire()
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "2"}
    queue.release()
    await waiters[0]
    assert order == [0] and (queue.running, queue.queued) == (1, 1)
    queue.release()
    await waiters[1]
    queue.release()
    assert (queue.running, queue.queued) == (0, 0)


async def test_admission_times_out_a_waiter_and_forgets_it() -> None:
    queue = AdmissionQueue(AdmissionConfig(max_concurrent=1, max_queued=1, queue_timeout_s=0.05))
    await queue.acquire()
    with pytest.raises(APIError, match="waited"):
        await queue.acquire()
    assert queue.queued == 0
    queue.release()
    assert queue.running == 0
