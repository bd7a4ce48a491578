"""The one dispatch/retry loop, driven by the router (real time) and the simulator (virtual time): try
the request on a worker, and while nothing has reached the client try again elsewhere, after a jittered
backoff on the injected `sleep`, within the shared retry budget and the request's deadline."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from microserve.router.request import RoutedRequest
from microserve.router.retry import RetryBudget, RetryConfig, backoff_s
from microserve.router.upstream import UpstreamHTTPError, WorkerFailure
from microserve.router.workers import NoWorkerAvailable

T = TypeVar("T")


def _nothing() -> None:
    pass


@dataclass(slots=True)
class RetryLoop:
    """`run(req, attempt)` calls `attempt()` until it returns; each failed worker is excluded from the
    next try. Raises the last `WorkerFailure` when the attempts, the budget or the deadline run out, a
    non-retryable `UpstreamHTTPError` at once, and `NoWorkerAvailable` if no worker was ever tried."""

    config: RetryConfig
    budget: RetryBudget
    rng: random.Random
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    on_retry: Callable[[], None] = field(default=_nothing)
    on_budget_exhausted: Callable[[], None] = field(default=_nothing)

    async def run(self, req: RoutedRequest, attempt: Callable[[], Awaitable[T]]) -> T:
        config = self.config
        last: WorkerFailure | None = None
        for n in range(config.max_attempts):
            if n:
                if req.remaining_s() <= 0:
                    break
                if not self.budget.try_spend():
                    self.on_budget_exhausted()
                    break
                self.on_retry()
                await self.sleep(min(backoff_s(n, config, self.rng), max(0.0, req.remaining_s())))
            try:
                return await attempt()
            except UpstreamHTTPError as exc:
                if not exc.retryable:
                    raise  # the client's mistake: another worker would say the same
                last = exc
            except WorkerFailure as exc:
                last = exc
            except NoWorkerAvailable:
                if last is None:
                    raise
                break
            req.excluded.add(last.worker.url)
        assert last is not None
        raise last
