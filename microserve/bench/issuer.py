"""The request-issuing loop of a run, written once for `microserve bench` (the wall clock, requests over
HTTP) and `microserve simulate` (the virtual clock, the simulated router): arrivals on their schedule, a
concurrency cap or a closed loop at rate inf, multi-turn follow-ups issued once their answer is back."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from microserve.bench.sender import RequestRecord
from microserve.bench.workloads import BenchRequest, RequestSource

# Sends one request and fills its record; returns the answer's text for a follow-up turn (None: it failed).
Send = Callable[[BenchRequest, RequestRecord], Awaitable[str | None]]


class IssueObserver(Protocol):
    def sent(self, request: BenchRequest) -> None: ...

    def finished(self, record: RequestRecord) -> None: ...


async def issue_requests(
    source: RequestSource,
    gaps: Iterable[float],
    send: Send,
    clock: Callable[[], float],
    *,
    request_rate: float,
    max_concurrency: int | None,
    duration_s: float | None,
    observer: IssueObserver | None = None,
) -> list[RequestRecord]:
    """Issue `source`'s requests after the given gaps until it runs out, the gaps end or `duration_s`
    passes on `clock`; returns every record, in request order, once all are answered. `asyncio.sleep`
    waits on the running loop, so a loop with a virtual clock runs the same schedule in virtual time."""
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    # At rate inf there is no schedule to keep: take a slot before issuing, so a --duration run stays a
    # closed loop of max_concurrency requests instead of queueing without end.
    closed_loop = slots if math.isinf(request_rate) else None  # its slots, where it is one
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task[None]] = set()
    answered = asyncio.Event()

    async def one(request: BenchRequest, arrival: float) -> None:
        record = RequestRecord(request, arrival=arrival)
        try:
            if slots is None or closed_loop is not None:
                answer = await send(request, record)
            else:
                async with slots:
                    answer = await send(request, record)
        finally:
            if closed_loop is not None:
                closed_loop.release()
        source.complete(request, answer)
        records.append(record)
        answered.set()
        if observer:
            observer.finished(record)

    async def next_request(deadline: float) -> BenchRequest | None:
        """The next ready request, waiting for answers a multi-turn follow-up needs; None: stop issuing."""
        while (request := source.next_ready()) is None and not source.exhausted:
            answered.clear()
            timeout = deadline - clock()
            if not tasks or timeout <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered.wait(), timeout=None if math.isinf(deadline) else timeout)
        return request

    start = clock()
    deadline = start + duration_s if duration_s else math.inf
    next_at = start
    try:
        for gap in gaps:
            next_at += gap
            if next_at >= deadline:
                break
            if (delay := next_at - clock()) > 0:
                await asyncio.sleep(delay)
            if closed_loop is not None:
                await closed_loop.acquire()
            request = await next_request(deadline)
            if request is None or clock() >= deadline:
                if closed_loop is not None:
                    closed_loop.release()
                break
            task = asyncio.create_task(one(request, clock()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if observer:
                observer.sent(request)
        while tasks:
            await asyncio.gather(*list(tasks))
    finally:
        for task in tasks:
            task.cancel()
    records.sort(key=lambda r: r.request.index)
    return records
