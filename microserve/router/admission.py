"""A bounded admission queue: up to `max_concurrent` requests run, up to `max_queued` wait in order, and
the rest are refused at once with 429 and Retry-After, so overload sheds load instead of piling it up."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

from microserve.api.errors import APIError


@dataclass(slots=True, frozen=True)
class AdmissionConfig:
    max_concurrent: int = 1024
    max_queued: int = 1024
    queue_timeout_s: float = 30.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_queued < 0:
            raise ValueError("need max_concurrent >= 1 and max_queued >= 0")
        if self.queue_timeout_s <= 0 or self.retry_after_s < 0:
            raise ValueError("need queue_timeout_s > 0 and retry_after_s >= 0")


def too_many_requests(message: str, retry_after_s: int) -> APIError:
    return APIError(
        429,
        message,
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after_s)},
    )


class AdmissionQueue:
    """FIFO slots; `acquire` returns once the request may run, or raises the 429 it should answer."""

    __slots__ = ("_waiters", "config", "running")

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        cfg = self.config
        if self.running < cfg.max_concurrent and not self._waiters:
            self.running += 1  # the fast path: no allocation, no await
            return
        if len(self._waiters) >= cfg.max_queued:
            raise too_many_requests(
                f"The router is at capacity ({cfg.max_concurrent} running, {cfg.max_queued} queued); "
                "retry later.",
                cfg.retry_after_s,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), cfg.queue_timeout_s)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # granted just as the timer fired: keep the slot
            self._forget(waiter)
            raise too_many_requests(
                f"The request waited {cfg.queue_timeout_s:g} s for a slot; retry later.", cfg.retry_after_s
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the client left after being granted: pass the slot on
            else:
                self._forget(waiter)
            raise

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        waiter.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def release(self) -> None:
        # Hand the slot straight to the next live waiter, so `running` never dips and overtakes the queue.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
