"""Admission sized to capacity: as many requests run as the ready workers can batch (what the engines
report), the rest wait in order only if they can start within their queue budget, by the expected wait
the measured drain rate gives; the others are refused at once with a Retry-After from that drain rate.

While no worker is ready (all down, every circuit open, a fleet scaled to zero) requests are held until
one is or their queue timeout passes (then 503 + Retry-After). The clock is injected, so the simulator
drives the same queue on virtual time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from microserve.api.errors import APIError
from microserve.router.breaker import HALF_OPEN
from microserve.router.fair_share import Order

if TYPE_CHECKING:
    from microserve.router.workers import Role, Worker

# How often a waiter looks again on its own: a circuit turning half-open or a worker turning ready is
# noticed within this even when nothing calls `wake`.
POLL_S = 0.25
# A request joins the queue only if it is expected to start within this share of its budget: slots free
# in bursts (a batch's requests end together), and one refused at entry is answered at once instead of
# after waiting its whole budget. A short queue still keeps every engine slot busy under overload.
QUEUE_MARGIN = 0.5
# Weight of the newest request in the smoothed service time.
SERVICE_ALPHA = 0.05


@dataclass(slots=True, frozen=True)
class AdmissionConfig:
    max_concurrent: int | None = None  # None: follow the workers (the sum of their batch sizes)
    per_worker: int = 64  # for a worker that does not report its batch size (other servers)
    max_queued: int = 1024  # a hard cap on waiters, whatever their expected wait
    max_queue_wait_s: float = 2.0  # a request that cannot start within this is refused
    queue_timeout_s: float = 30.0  # the longest a request is held while no worker is ready
    retry_after_s: int = 1  # Retry-After while the drain rate is unknown

    def __post_init__(self) -> None:
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError("need max_concurrent >= 1 (or unset, to follow the workers)")
        if self.per_worker < 1 or self.max_queued < 0:
            raise ValueError("need per_worker >= 1 and max_queued >= 0")
        if self.max_queue_wait_s < 0 or self.queue_timeout_s <= 0 or self.retry_after_s < 0:
            raise ValueError("need max_queue_wait_s >= 0, queue_timeout_s > 0 and retry_after_s >= 0")


def too_many_requests(message: str, retry_after_s: int) -> APIError:
    return APIError(
        429,
        message,
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after_s)},
    )


def no_worker_ready(message: str, retry_after_s: int) -> APIError:
    return APIError(503, message, code="no_worker_available", headers={"Retry-After": str(retry_after_s)})


def pool_capacity(workers: Iterable[Worker], per_worker: int, roles: Iterable[Role] = ()) -> int:
    """Requests the available workers run at once: each engine's reported batch size (max_num_seqs),
    `per_worker` for a worker that reports none, the trial requests of a half-open circuit; 0 when none
    is available, or none for one of `roles` (the strategy's: PD needs a prefill and a decode worker)."""
    total = 0
    for worker in workers:
        if not worker.available:
            continue
        breaker = worker.breaker
        if not breaker.closed and breaker.state is HALF_OPEN:  # on trial: the rest wait for its verdict
            total += breaker.config.half_open_trials
            continue
        load = worker.load
        total += load.max_num_seqs if load is not None and load.max_num_seqs else per_worker
    if roles and total:
        available = [w for w in workers if w.available]
        if any(not any(w.role.can(role) for w in available) for role in roles):
            return 0
    return total


class AdmissionQueue:
    """`acquire` returns once the request may run (a ticket, for `release`), or raises the 429 or 503 it
    should answer. Waiters are served by `priority` (lower first: an `Order` from
    `fair_share.FairShare`, priority class then fair-share start tag), then in arrival order."""

    __slots__ = (
        "_capacity",
        "_clock",
        "_granted",
        "_seq",
        "_tickets",
        "_waiters",
        "config",
        "running",
        "service_s",
    )

    def __init__(
        self,
        config: AdmissionConfig | None = None,
        capacity: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or AdmissionConfig()
        self._capacity = capacity  # None: always ready, `max_concurrent` (or 1024) slots
        self._clock = clock
        self.running = 0
        self.service_s: float | None = None  # smoothed seconds a request holds its slot
        self._waiters: list[tuple[Order, int, asyncio.Future[int]]] = []  # a heap
        self._seq = itertools.count()
        # Running requests' grant times by ticket, oldest first (grants come in time order).
        self._granted: dict[int, float] = {}
        self._tickets = itertools.count(1)

    def now(self) -> float:
        """The queue's clock (the simulator's virtual one under simulation)."""
        return self._clock()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def full(self) -> bool:
        """Whether `acquire` would wait now (a request queued, or every slot taken)."""
        return bool(self._waiters) or self.running >= self.limit

    @property
    def _sized_by_workers(self) -> bool:
        return self._capacity is not None and self.config.max_concurrent is None

    @property
    def limit(self) -> int:
        """Requests that may run now; 0 while no worker is ready."""
        fixed = self.config.max_concurrent
        if self._capacity is None:
            return fixed if fixed is not None else 1024
        capacity = self._capacity()
        if capacity <= 0:
            return 0
        return fixed if fixed is not None else capacity

    def expected_wait_s(self, ahead: int) -> float | None:
        """Seconds until a request with `ahead` waiters before it starts; None while unknown.

        The larger of two estimates: the mean drain rate (a slot frees every service_s / limit), and
        when the (ahead+1)-th oldest running request is due to end (its grant time + service_s). The
        second sees that slots free in waves (a batch's requests start, and end, together)."""
        limit = self.limit
        service = self.service_s
        if service is None or limit <= 0:
            return None
        steady = (ahead + 1) * service / limit
        if ahead >= len(self._granted):
            return steady
        due = next(itertools.islice(self._granted.values(), ahead, None)) + service
        return max(steady, due - self._clock())

    def retry_after(self) -> int:
        """Whole seconds for the queue as it stands to drain; the configured default while unknown."""
        wait = self.expected_wait_s(len(self._waiters))
        return self.config.retry_after_s if wait is None else max(1, math.ceil(wait))

    async def acquire(self, priority: Order = (0, 0.0), timeout_s: float | None = None) -> int:
        """Wait for a slot; `timeout_s` (the request's own deadline) shortens the hold if sooner."""
        granted = self.take_free()
        if granted is not None:
            return granted
        cfg = self.config
        limit = self.limit
        if len(self._waiters) >= cfg.max_queued and not self._evict_after(priority):
            raise too_many_requests(
                f"The router is at capacity ({limit} running, {len(self._waiters)} queued); retry later.",
                self.retry_after(),
            )
        wait = self.expected_wait_s(self._ahead_of(priority))
        if wait is None and self._sized_by_workers and limit > 0:
            # Every engine slot is taken and no request has finished yet, so there is no drain rate to
            # promise a start within the budget: refuse now rather than after the budget (the first
            # requests to finish, seconds later, open the queue).
            raise too_many_requests(
                f"The router is at capacity ({limit} running, {len(self._waiters)} queued); retry later.",
                self.retry_after(),
            )
        if wait is not None and wait > QUEUE_MARGIN * cfg.max_queue_wait_s:
            raise too_many_requests(
                f"The router is at capacity: a new request would wait about {wait:.1f} s to start, and "
                f"it queues only those expected to start within {QUEUE_MARGIN * cfg.max_queue_wait_s:g} s; "
                "retry later.",
                self.retry_after(),
            )
        return await self._wait(priority, timeout_s)

    def take_free(self) -> int | None:
        """A slot at once if one is free and nobody waits (no await); its ticket, or None."""
        if not self._waiters and self.running < self.limit:
            return self._take()
        return None

    def _take(self) -> int:
        self.running += 1
        ticket = next(self._tickets)
        self._granted[ticket] = self._clock()
        return ticket

    async def _wait(self, priority: Order, timeout_s: float | None) -> int:
        cfg = self.config
        start = self._clock()
        hold = cfg.queue_timeout_s if timeout_s is None else min(cfg.queue_timeout_s, max(0.0, timeout_s))
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), waiter))
        ready_since = start  # the queue budget runs while workers are ready
        try:
            while True:
                now = self._clock()
                waited = now - start
                # None ready: the request is held for one to come back (up to its queue timeout). Workers
                # ready: it waits no longer than its queue budget, counted from when they were.
                if self.limit > 0:
                    left = min(hold - waited, ready_since + cfg.max_queue_wait_s - now)
                else:
                    ready_since = now
                    left = hold - waited
                if left <= 0:
                    self._grant()  # a slot freed just now still counts
                    if waiter.done():
                        return waiter.result()
                    raise self._timed_out(waited)
                try:
                    return await asyncio.wait_for(asyncio.shield(waiter), min(POLL_S, left))
                except TimeoutError:
                    if waiter.done():
                        return waiter.result()  # granted just as the timer fired: keep the slot
                    self._grant()  # capacity may have come back with nobody calling `wake`
                    if waiter.done():
                        return waiter.result()
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())  # granted, but the client left: pass the slot on
            else:
                waiter.cancel()
                self._forget(waiter)
            raise

    def _timed_out(self, waited: float) -> APIError:
        if self.limit <= 0:
            return no_worker_ready(
                f"No worker became ready within {waited:.3g} s; retry later.", self.config.retry_after_s
            )
        return too_many_requests(
            f"The request waited {waited:.3g} s for a slot; retry later.", self.retry_after()
        )

    def _ahead_of(self, priority: Order) -> int:
        """Waiters that would start before a request of `priority`: all of them, unless fair sharing
        puts it ahead of some."""
        return sum(1 for entry in self._waiters if entry[0] <= priority)

    def outranked(self, rank: int) -> bool:
        """Whether a request of a more urgent priority class than `rank` waits."""
        return any(entry[0][0] < rank for entry in self._waiters)

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
        if not waiter.done():
            waiter.set_exception(
                too_many_requests(
                    f"The router is at capacity ({self.limit} running, {len(self._waiters)} queued) and "
                    "this request was the last in line; retry later.",
                    self.retry_after(),
                )
            )
        return True

    def admit_now(self) -> int | None:
        """A slot at once, over the limit (up to twice it), for a tenant below its fair share of the
        slots (`fair_share`); its ticket, or None. `_grant` refills only below the limit, so the
        other tenants' slots shrink back. Never while no worker is ready."""
        limit = self.limit
        if limit > 0 and self.running < 2 * limit:
            return self._take()
        return None

    def _forget(self, waiter: asyncio.Future[int]) -> None:
        for i, entry in enumerate(self._waiters):
            if entry[2] is waiter:
                self._waiters[i] = self._waiters[-1]
                self._waiters.pop()
                heapq.heapify(self._waiters)
                return

    def _grant(self) -> None:
        """Hand free slots to the waiters at the head, while the limit allows."""
        limit = self.limit
        waiters = self._waiters
        while waiters and self.running < limit:
            _, _, waiter = heapq.heappop(waiters)
            if not waiter.done():
                waiter.set_result(self._take())

    def wake(self) -> None:
        """Capacity may have changed (a health check ran, a worker joined): start whoever now can."""
        if self._waiters:
            self._grant()

    def release(self, ticket: int | None = None) -> None:
        """A request ended; with its ticket, its slot time joins the service-time estimate."""
        self.running -= 1
        granted_at = self._granted.pop(ticket, None) if ticket is not None else None
        if granted_at is not None:
            held = self._clock() - granted_at
            s = self.service_s
            self.service_s = held if s is None else s + SERVICE_ALPHA * (held - s)
        if self._waiters:
            self._grant()
