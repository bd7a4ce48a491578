"""The autoscaler on the virtual clock: the router's `Autoscaler` sizes the simulated fleet per role.

A replica it adds joins the pool after `startup_s` (an engine's start-up: process, imports, weights); the
one it removes is the idlest, drained first and stopped once nothing is in flight on it, as in `serve`;
with a hand-off configured, its hottest prefixes move to the idlest survivor first (`router/handoff.py`,
the transfer taking its modelled time). Engine-seconds count from a replica's start (start-up included)
to its stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from microserve.engine.errors import EngineOverloaded
from microserve.engine_client import KVAddress
from microserve.router.autoscaler import (
    AutoscalerConfig,
    PoolAutoscaler,
    idlest,
    pool_signals,
    recent_ttft_p99,
)
from microserve.router.handoff import HandoffConfig, HandoffPeer, HandoffResult, hand_off
from microserve.router.workers import Role
from microserve.simulator.host import SimRouter
from microserve.simulator.replica import SimReplica


@dataclass(frozen=True, slots=True)
class SimScaling:
    """`--autoscale`: the autoscaler's settings (the same for each role's pool) and the simulated start-up."""

    config: AutoscalerConfig
    startup_s: float = 20.0
    interval_s: float = 1.0
    handoff: HandoffConfig | None = None  # move a leaving replica's hottest prefixes to a survivor
    ttft_window_s: float = 10.0  # the TTFT signal's window (with the config's ttft_slo_s)

    def __post_init__(self) -> None:
        if self.startup_s < 0 or self.interval_s <= 0:
            raise ValueError("need start-up >= 0 s and an interval > 0 s")


class SimScaler:
    """Drives a `SimRouter`'s pool from its autoscaler; `run` until cancelled."""

    def __init__(
        self, router: SimRouter, scaling: SimScaling, roles: set[Role], make: Callable[[str], SimReplica]
    ) -> None:
        self.router = router
        self.scaling = scaling
        self.autoscaler = PoolAutoscaler({str(r): scaling.config for r in roles})
        self.make = make
        self.starting: dict[str, int] = {str(r): 0 for r in roles}
        self.draining: set[str] = set()
        self.started_at: dict[str, float] = {}
        self.stopped_at: dict[str, float] = {}
        self.timeline: list[tuple[float, int]] = []  # (virtual time, replicas up or starting)
        self.handoffs: list[HandoffResult] = []
        self.failures: list[BaseException] = []
        self._count = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def adopt(self, url: str, now: float) -> None:
        self.started_at[url] = now

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.tick(loop.time())
            await asyncio.sleep(self.scaling.interval_s)

    def tick(self, now: float) -> None:
        router = self.router
        queued = router.admission.queued if router.admission is not None else 0
        ttft = None
        if self.scaling.config.ttft_slo_s is not None:
            ttft = recent_ttft_p99(router.ttft_samples(now), now, self.scaling.ttft_window_s)
        total = 0
        for role in self.autoscaler.scalers:
            workers = [w for w in router.pool if str(w.role) == role]
            # Requests held in the router wait for any pool; each pool sees them all (PD needs both).
            signals = pool_signals(workers, queued, self.starting[role], ttft)
            desired = self.autoscaler.scalers[role].decide(now, signals)
            for _ in range(desired - signals.replicas):
                self._spawn(self._start(Role(role), now))
            for _ in range(signals.replicas - desired):
                worker = idlest(w for w in workers if not w.draining)
                if worker is None:
                    break  # the rest are still starting: they join, and go on a later decision
                worker.draining = True
                self.draining.add(worker.url)
                self._spawn(self._retire(worker.url))
            total += desired
        if not self.timeline or self.timeline[-1][1] != total:
            self.timeline.append((now, total))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failures.append(task.exception())  # type: ignore[arg-type]

    async def _start(self, role: Role, now: float) -> None:
        self._count += 1
        name = f"scaled-{self._count}"
        self.starting[str(role)] += 1
        url = f"http://{name}.sim"
        self.started_at[url] = now
        try:
            await asyncio.sleep(self.scaling.startup_s)
        finally:
            self.starting[str(role)] -= 1
        self.router.add_replica(url, self.make(name), role)

    async def _retire(self, url: str) -> None:
        loop = asyncio.get_running_loop()
        worker = self.router.pool.get(url)
        while worker.in_flight > 0:
            await asyncio.sleep(0.1)
        if self.scaling.handoff is not None:
            await self._hand_off(url)
        self.router.retire_replica(url)
        self.draining.discard(url)
        self.stopped_at[url] = loop.time()

    async def _hand_off(self, url: str) -> None:
        router = self.router
        role = router.pool.get(url).role
        survivor = idlest(w for w in router.pool if w.role == role and not w.draining and w.url != url)
        if survivor is None or self.scaling.handoff is None:
            return
        loop = asyncio.get_running_loop()
        src = ReplicaPeer(url, router.replicas[url])
        dst = ReplicaPeer(survivor.url, router.replicas[survivor.url])
        result = await hand_off(src, dst, self.scaling.handoff, loop.time, REPLICA_ERRORS)
        router.policy.handed_off(url, survivor.url, result.prefixes)
        self.handoffs.append(result)

    def engine_seconds(self, end: float) -> float:
        return sum(self.stopped_at.get(url, end) - start for url, start in self.started_at.items())

    async def stop(self) -> None:
        """Cancel what is under way; a start or retirement that failed fails the run here."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.failures:
            raise RuntimeError(f"the simulated autoscaler failed: {self.failures[0]!r}") from self.failures[0]


REPLICA_ERRORS: tuple[type[BaseException], ...] = (ValueError, EngineOverloaded, RuntimeError)


class ReplicaPeer:
    """A simulated replica as the hand-off uses it: the same verbs, on the virtual clock."""

    def __init__(self, url: str, replica: SimReplica) -> None:
        self.url = url
        self.replica = replica

    async def hot_prefixes(self, max_tokens: int, limit: int) -> list[list[int]]:
        return self.replica.hot_prefixes(max_tokens, limit)

    async def prep_recv(self, request_id: str, prompt_ids: list[int]) -> KVAddress:
        matched = self.replica.prep_recv(request_id, prompt_ids, len(prompt_ids))
        return KVAddress({"request_id": request_id, "begin": matched, "end": len(prompt_ids)}, matched)

    async def remote_send(
        self, request_id: str, prompt_ids: list[int], addr: KVAddress, dst: HandoffPeer
    ) -> tuple[int, int]:
        assert isinstance(dst, ReplicaPeer)
        sent = await self.replica.send(request_id, prompt_ids, addr.matched, dst.replica)
        return sent, sent * self.replica.config.cost.kv_bytes_per_token

    async def release(self, request_id: str) -> bool:
        return self.replica.release(request_id)
