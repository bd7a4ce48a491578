"""The router's discovery loop: each `--discovery` source's membership applied to the pool as it changes,
joiners health-checked at once, leavers swept out once idle; their state for /ready and the metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from microserve.router.discovery.base import Discovery
from microserve.router.discovery.membership import Membership
from microserve.router.tasks import cancel_all
from microserve.router.workers import Worker, WorkerPool, WorkerSpec

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.2  # how soon an idle leaver leaves the pool


class SourceSync:
    """One source followed into the pool."""

    def __init__(self, discovery: Discovery, membership: Membership) -> None:
        self.discovery = discovery
        self.membership = membership
        self.applied = asyncio.Event()  # the first membership is in the pool (and checked)

    async def run(self, check: Callable[[Worker], Awaitable[object]]) -> None:
        async for specs in self.discovery.watch():
            await self.apply(specs, check)
            self.applied.set()

    async def apply(self, specs: list[WorkerSpec], check: Callable[[Worker], Awaitable[object]]) -> None:
        changes = self.membership.apply(specs, time.monotonic())
        name = self.discovery.name
        for worker in changes.joined:
            log.info("%s: %s joined (%s, %s)", name, worker.url, worker.role, ", ".join(worker.spec.models))
        for worker in changes.leaving:
            log.info("%s: %s left; draining it (%d in flight)", name, worker.url, worker.in_flight)
        for url in changes.foreign:
            log.warning("%s: %s is already in the pool from elsewhere; leaving it as it is", name, url)
        # Checked now rather than at the next health round: a joiner takes traffic once it is ready.
        await asyncio.gather(*(check(w) for w in changes.joined))

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.discovery.name,
            **self.discovery.status.describe(),
            "workers": len(self.membership.owned - self.membership.leaving.keys()),
            "draining": len(self.membership.leaving),
        }


class DiscoveryFleet:
    """Every source of one router, started with it and stopped with it."""

    def __init__(self, pool: WorkerPool, sources: list[Discovery], drain_timeout_s: float) -> None:
        self.syncs = [SourceSync(d, Membership(pool, d.name, drain_timeout_s)) for d in sources]
        self._tasks: list[asyncio.Task[None]] = []

    def __bool__(self) -> bool:
        return bool(self.syncs)

    async def start(self, check: Callable[[Worker], Awaitable[object]], wait_s: float) -> None:
        """Follow every source; wait (up to `wait_s`) until each has put its membership in the pool or
        failed to reach its registry, so that a restarted router serves its fleet from the first request."""
        if not self.syncs:
            return
        for sync in self.syncs:
            self._tasks.append(asyncio.create_task(self._follow(sync, check), name=sync.discovery.name))
        self._tasks.append(asyncio.create_task(self._sweep(), name="discovery-sweep"))
        await asyncio.gather(*(self._first(sync, wait_s) for sync in self.syncs))

    async def _first(self, sync: SourceSync, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while not sync.applied.is_set():
            status = sync.discovery.status
            if sync.discovery.settled.is_set() and not status.connected:
                log.warning("%s: not reachable at start (%s); serving without it", sync.discovery.name,
                            status.error)  # fmt: skip
                return
            # Once the source has read its registry, only the membership being applied is awaited.
            events = (
                [sync.applied] if sync.discovery.settled.is_set() else [sync.applied, sync.discovery.settled]
            )
            waits = [asyncio.ensure_future(e.wait()) for e in events]
            try:
                await asyncio.wait(waits, timeout=deadline - time.monotonic(), return_when="FIRST_COMPLETED")
            finally:
                for w in waits:
                    w.cancel()
            if time.monotonic() >= deadline:
                log.warning("%s: no membership after %g s; serving without it", sync.discovery.name, wait_s)
                return

    async def _follow(self, sync: SourceSync, check: Callable[[Worker], Awaitable[object]]) -> None:
        while True:
            try:
                await sync.run(check)
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one source must not end discovery for good
                log.exception("%s: discovery failed; restarting it", sync.discovery.name)
                await asyncio.sleep(1.0)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            for sync in self.syncs:
                for worker in sync.membership.sweep(time.monotonic()):
                    log.info("%s: %s drained and removed", sync.discovery.name, worker.url)

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        self._tasks = []
        for sync in self.syncs:
            await sync.discovery.close()

    def connected(self) -> bool:
        return all(sync.discovery.status.connected for sync in self.syncs)

    def describe(self) -> list[dict[str, Any]]:
        return [sync.describe() for sync in self.syncs]

    def source_of(self, url: str) -> str | None:
        return next((s.discovery.name for s in self.syncs if url in s.membership.owned), None)


class DiscoveryCollector:
    """The sources' state at scrape time (docs/observability.md)."""

    def __init__(self, fleet: DiscoveryFleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        prefix = "microserve_router_discovery_"
        up = GaugeMetricFamily(
            prefix + "connected",
            "1 if the discovery source's registry answers; 0: the router keeps the last membership.",
            labels=["source"],
        )
        workers = GaugeMetricFamily(
            prefix + "workers", "Workers each discovery source holds in the pool now.", labels=["source"]
        )
        changes = CounterMetricFamily(
            prefix + "changes",
            "Workers that joined or left, by discovery source.",
            labels=["source", "change"],
        )
        for sync in self.fleet.syncs:
            name = sync.discovery.name
            up.add_metric([name], float(sync.discovery.status.connected))
            workers.add_metric([name], len(sync.membership.owned - sync.membership.leaving.keys()))
            changes.add_metric([name, "joined"], sync.membership.joins)
            changes.add_metric([name, "left"], sync.membership.leaves)
        yield up
        yield workers
        yield changes
