"""The stall watch: a deadline per read of a stream, with one timer at a time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from microserve.router.stall_watch import StallWatch


class CountingLoop:
    """The running loop, counting the timers the watch sets."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.timers = 0

    def call_at(self, when: float, callback: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self.loop.call_at(when, callback)


async def read(watch: StallWatch, deadline: float, seconds: float) -> str:
    """One read that takes `seconds`, watched with `deadline`: 'data', or 'stalled' if the watch ended it."""
    task = asyncio.current_task()
    assert task is not None
    watch.waiting(deadline, task)
    try:
        await asyncio.sleep(seconds)
        return "data"
    except asyncio.CancelledError:
        if not watch.expired(task):
            raise
        return "stalled"
    finally:
        watch.done()


async def test_a_flowing_stream_is_never_stalled_and_sets_few_timers() -> None:
    loop = asyncio.get_running_loop()
    counting = CountingLoop(loop)
    watch = StallWatch(counting)  # type: ignore[arg-type]
    stall_s = 0.4
    start = loop.time()
    reads = 0
    while loop.time() - start < 2.5 * stall_s:  # past two stall periods in all, each read well within its own
        assert await read(watch, loop.time() + stall_s, 0.01) == "data"
        reads += 1
    watch.close()
    assert counting.timers <= 6 < reads  # re-armed when it fired early, not once per read


async def test_a_read_past_its_deadline_is_stalled_and_the_task_is_not_left_cancelled() -> None:
    loop = asyncio.get_running_loop()
    watch = StallWatch(loop)
    assert await read(watch, loop.time() + 0.5, 0.01) == "data"
    assert await read(watch, loop.time() + 0.05, 5.0) == "stalled"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # no cancellation pending
    assert await read(watch, loop.time() + 0.5, 0.01) == "data"  # the watch goes on after a stall
    watch.close()


async def test_the_clock_stops_while_the_consumer_holds_a_chunk() -> None:
    loop = asyncio.get_running_loop()
    watch = StallWatch(loop)
    assert await read(watch, loop.time() + 0.3, 0.01) == "data"
    await asyncio.sleep(0.9)  # a slow client: three stall periods between two reads
    assert await read(watch, loop.time() + 0.3, 0.01) == "data"
    watch.close()


async def test_another_cancellation_is_not_taken_for_a_stall() -> None:
    loop = asyncio.get_running_loop()
    watch = StallWatch(loop)
    reading = asyncio.create_task(read(watch, loop.time() + 5.0, 5.0))
    await asyncio.sleep(0.01)
    reading.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await reading
    watch.close()


async def test_an_earlier_deadline_than_the_armed_timer_is_kept() -> None:
    loop = asyncio.get_running_loop()
    watch = StallWatch(loop)
    assert await read(watch, loop.time() + 10.0, 0.01) == "data"  # a long first-byte deadline armed
    assert await read(watch, loop.time() + 0.05, 5.0) == "stalled"  # then a short stall deadline
    watch.close()
