"""Applying a discovery source's membership to a `WorkerPool`: joiners are added unhealthy (traffic once
their first health check passes), leavers drain (no new requests) and leave the pool once idle or after
the drain timeout. Plain logic on a clock the caller passes, so any driver (router, simulator) can run it.

A source only touches the workers it added: a URL already in the pool (flags, YAML, admin API, another
source) is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from microserve.router.workers import Worker, WorkerPool, WorkerSpec

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Changes:
    joined: list[Worker] = field(default_factory=list)
    leaving: list[Worker] = field(default_factory=list)
    updated: list[Worker] = field(default_factory=list)  # same URL, new role, labels, models or weight
    returned: list[Worker] = field(default_factory=list)  # left, then came back before it was idle
    foreign: list[str] = field(default_factory=list)  # URLs another source already holds

    def __bool__(self) -> bool:
        return bool(self.joined or self.leaving or self.updated or self.returned)


class Membership:
    def __init__(self, pool: WorkerPool, source: str, drain_timeout_s: float) -> None:
        self.pool = pool
        self.source = source
        self.drain_timeout_s = drain_timeout_s
        self.owned: set[str] = set()  # URLs this source added and that are still in the pool
        self.leaving: dict[str, float] = {}  # URL -> when it leaves the pool even if busy
        self.joins = 0
        self.leaves = 0

    def apply(self, specs: list[WorkerSpec], now: float) -> Changes:
        """Make the pool hold exactly `specs` among this source's workers."""
        changes = Changes()
        wanted = {spec.url: spec for spec in specs}
        self.owned &= {w.url for w in self.pool}  # removed by hand (admin API) meanwhile: not ours now
        for url, spec in wanted.items():
            if url in self.owned:
                worker = self.pool.get(url)
                if url in self.leaving:
                    del self.leaving[url]
                    worker.draining = False
                    changes.returned.append(worker)
                if worker.spec != spec:
                    worker.spec = spec
                    worker.models = set(spec.models) or worker.models
                    changes.updated.append(worker)
            elif url in self.pool:
                changes.foreign.append(url)
            else:
                worker = self.pool.add(spec)
                worker.healthy = False  # until its first health check: joins once ready
                self.owned.add(url)
                self.joins += 1
                changes.joined.append(worker)
        for url in sorted(self.owned - wanted.keys() - self.leaving.keys()):
            worker = self.pool.get(url)
            worker.draining = True
            self.leaving[url] = now + self.drain_timeout_s
            self.leaves += 1
            changes.leaving.append(worker)
        return changes

    def sweep(self, now: float) -> list[Worker]:
        """Take out the leavers that are idle now or out of time; those still busy finish on the `Worker`
        they hold (a request in flight never loses its worker)."""
        gone = []
        for url, deadline in list(self.leaving.items()):
            if url not in self.pool:  # removed by hand meanwhile
                del self.leaving[url]
                self.owned.discard(url)
                continue
            worker = self.pool.get(url)
            if worker.in_flight == 0 or now >= deadline:
                if worker.in_flight:
                    log.warning("%s: %s left with %d requests in flight", self.source, url, worker.in_flight)
                del self.leaving[url]
                self.owned.discard(url)
                gone.append(self.pool.remove(url))
        return gone
