"""The simulator's virtual event loop: time moves exactly from timer to timer, and never for real."""

from __future__ import annotations

import asyncio
import time

import pytest

from microserve.simulator.clock import SimulationDeadlock, run_virtual


def test_sleeps_advance_the_clock_exactly_and_take_no_real_time() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        seen = [loop.time()]
        await asyncio.sleep(1.5)
        seen.append(loop.time())
        await asyncio.gather(asyncio.sleep(3600.0), asyncio.sleep(2.0))  # concurrent: the longest counts
        seen.append(loop.time())
        await asyncio.sleep(0)  # a yield is not a wait
        seen.append(loop.time())
        return seen

    wall = time.perf_counter()
    assert run_virtual(main()) == [0.0, 1.5, 3601.5, 3601.5]
    assert time.perf_counter() - wall < 0.5  # an hour of virtual time, no real sleeping


def test_timers_fire_in_order_at_their_own_times() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[str, float]] = []
        for name, delay in (("c", 3.0), ("a", 1.0), ("b", 2.0)):
            loop.call_later(delay, lambda n=name: fired.append((n, loop.time())))
        await asyncio.sleep(5.0)
        return fired

    assert run_virtual(main()) == [("a", 1.0), ("b", 2.0), ("c", 3.0)]


def test_timeouts_run_on_virtual_time() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(5.0):
                await asyncio.sleep(10.0)
        return loop.time()

    assert run_virtual(main()) == 5.0


def test_waiting_for_what_nothing_will_cause_is_a_deadlock_not_a_hang() -> None:
    async def main() -> None:
        await asyncio.Event().wait()

    with pytest.raises(SimulationDeadlock):
        run_virtual(main())
