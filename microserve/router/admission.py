"""A bounded admission queue: up to `max_concurrent` requests run, up to `max_queued` wait in order, and
the rest are refused at once with 429 and Retry-After, so overload sheds load instead of piling it up."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass

from microserve.router.fair_share import Order
from microserve.server.errors import APIError


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
    """Slots; `acquire` returns once the request may run, or raises the 429 it should answer. Waiters
    are served by `priority` (lower first: an `Order` from `fair_share.FairShare`), then by arrival."""

    __slots__ = ("_seq", "_waiters", "config", "running")

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()
        self.running = 0
        self._waiters: list[tuple[Order, int, asyncio.Future[None]]] = []  # a heap
        self._seq = itertools.count()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self, priority: Order = (0, 0.0)) -> None:
        cfg = self.config
        if self.running < cfg.max_concurrent and not self._waiters:
            self.running += 1  # the fast path: no allocation, no await
            return
        if len(self._waiters) >= cfg.max_queued and not self._evict_after(priority):
            raise too_many_requests(
                f"The router is at capacity ({cfg.max_concurrent} running, {cfg.max_queued} queued); "
                "retry later.",
                cfg.retry_after_s,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), waiter))
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

    def _evict_after(self, priority: Order) -> bool:
        """Full: refuse the waiter that would be served last instead, if it comes after `priority` (a
        noisy tenant's backlog is shed before a quiet tenant's request)."""
        if not self._waiters:
            return False
        last = max(range(len(self._waiters)), key=lambda i: self._waiters[i][:2])
        if self._waiters[last][0] <= priority:
            return False
        _, _, waiter = self._waiters[last]
        self._waiters[last] = self._waiters[-1]
        self._waiters.pop()
        heapq.heapify(self._waiters)
        cfg = self.config
        if not waiter.done():
            waiter.set_exception(
                too_many_requests(
                    f"The router is at capacity ({cfg.max_concurrent} running, {cfg.max_queued} queued) "
                    "and this request was the last in line; retry later.",
                    cfg.retry_after_s,
                )
            )
        return True

    def admit_now(self, over: int) -> bool:
        """Take a slot at once if fewer than the limit + `over` run (a tenant below its fair share
        overtakes the queue; see `fair_share`). The queue refills only below the limit."""
        if self.running < self.config.max_concurrent + over:
            self.running += 1
            return True
        return False

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        waiter.cancel()
        for i, entry in enumerate(self._waiters):
            if entry[2] is waiter:
                self._waiters[i] = self._waiters[-1]
                self._waiters.pop()
                heapq.heapify(self._waiters)
                return

    def release(self) -> None:
        # Hand the slot straight to the next live waiter, so `running` never dips and overtakes the queue;
        # not while over the limit (after `admit_now`).
        while self._waiters and self.running <= self.config.max_concurrent:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
