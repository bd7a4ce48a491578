"""A deadline over a stream's waits that moves on with each chunk: what entering `asyncio.timeout_at`
around every read of the stream does, at the cost of a few attribute stores per read.

`asyncio.timeout_at` costs about 3 µs a use (a `Timeout` object, the current task looked up through
`get_running_loop`, which makes a getpid system call, a timer pushed on the loop's heap and cancelled), and
a relayed stream entered it for every token. Here one timer runs at a time: armed for the first deadline,
it finds the deadline moved on when it fires and re-arms for the new one, so a stream that keeps flowing
re-arms once per stall period instead of once per chunk. Only the time spent waiting counts: the clock
stops while the consumer holds the chunk (a slow client is not a stalled worker).
"""

from __future__ import annotations

import asyncio
import math


class StallWatch:
    """`waiting(deadline, task)` before each read and `done()` after it; a read still waiting at its
    deadline has its task cancelled, and `expired(...)` then tells that cancellation from any other."""

    __slots__ = ("_cancelling", "_deadline", "_fired", "_loop", "_task", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._deadline = math.inf
        self._task: asyncio.Task[object] | None = None  # the task of the read in progress, if any
        self._cancelling = 0
        self._fired = False

    def waiting(self, deadline: float, task: asyncio.Task[object]) -> None:
        """A read begins that must end by `deadline` (loop time), in `task`."""
        self._deadline, self._task, self._fired = deadline, task, False
        self._cancelling = task.cancelling()
        if self._timer is None or self._timer_at > deadline:
            self._arm(deadline)

    def done(self) -> None:
        """The read ended (with a chunk or otherwise): the clock stops until the next one."""
        self._task = None

    def expired(self, task: asyncio.Task[object]) -> bool:
        """After the read raised CancelledError in `task`: True if the deadline did it (the cancellation
        is then taken back, as `asyncio.timeout` does), False for any other cancellation."""
        if not self._fired:
            return False
        self._fired = False
        return task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        task = self._task
        if task is None:
            return  # between reads: the next one arms the timer again
        if self._deadline > self._timer_at:
            self._arm(self._deadline)  # the deadline moved on since the timer was set
            return
        self._fired = True
        task.cancel()
