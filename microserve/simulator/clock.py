"""Virtual time for asyncio: an event loop whose clock jumps to the next timer instead of sleeping.

The real strategies (async generators), the engine loops and the arrivals all run unchanged on it.
"""

from __future__ import annotations

import asyncio
import selectors
from asyncio import base_events
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class SimulationDeadlock(RuntimeError):
    """Nothing is ready and no timer is set: in virtual time nothing can ever happen again."""


class VirtualSelector(selectors.SelectSelector):
    """A selector whose `select(timeout)` advances the virtual clock by `timeout` and reports no I/O.

    asyncio asks it to wait exactly until the earliest timer, so time moves from event to event. The
    simulation does no I/O (no sockets, no threads), so nothing is lost by never polling: the loop's
    own self-pipe is registered here and simply never reported.
    """

    def __init__(self, next_timer: Callable[[], float | None]) -> None:
        super().__init__()
        self.now = 0.0
        self._next_timer = next_timer

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise SimulationDeadlock("the simulation is waiting for an event that nothing will ever cause")
        if timeout > 0:
            # The loop asked to wait exactly until its earliest timer (unless that is beyond its cap): land
            # on that timer's own time, since now + (when - now) can miss it by a rounding error.
            when = self._next_timer()
            # typeshed omits this real constant: the cap asyncio puts on a select's timeout
            capped = timeout >= base_events.MAXIMUM_SELECT_TIMEOUT  # type: ignore[attr-defined]
            self.now = when if when is not None and not capped else self.now + timeout
        return []


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual seconds (from 0): `loop.time()`, `asyncio.sleep` and timeouts use them."""

    def __init__(self) -> None:
        self._virtual = VirtualSelector(self._next_timer)
        super().__init__(self._virtual)

    def _next_timer(self) -> float | None:
        # asyncio keeps its timers in a heap and drops cancelled ones from its head before it selects
        # (a private attribute, which typeshed leaves out).
        scheduled = self._scheduled  # type: ignore[attr-defined]
        return scheduled[0].when() if scheduled else None

    def time(self) -> float:
        return self._virtual.now


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh virtual-time loop and close the loop."""
    with asyncio.Runner(loop_factory=VirtualEventLoop) as runner:
        return runner.run(main)
