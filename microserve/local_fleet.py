"""`serve`'s autoscaling actuator: the autoscaler's decisions, acted on with local engine processes.

One pool per role (`--roles prefill:1,decode:2`; one `both` pool by default), each sized by its own
autoscaler from its own engines' signals (requests held in the router count for every pool: PD needs both).
A new engine joins the router once it is ready (requests held by admission start then); the engine that
leaves is the idlest, drained first (no new requests) and stopped only once nothing is in flight on it,
after its hottest prefixes moved to the idlest survivor (`router/handoff.py`) when a hand-off is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from microserve.router.autoscaler import (
    Autoscaler,
    PoolAutoscaler,
    idlest,
    pool_signals,
    recent_ttft_p99,
)
from microserve.router.handoff import EnginePeer, HandoffConfig, HandoffResult, hand_off
from microserve.router.router import Router
from microserve.router.workers import Role, WorkerKind, WorkerSpec

log = logging.getLogger(__name__)


class EngineLike(Protocol):  # the part of serve.EngineProcess used here
    index: int
    port: int

    @property
    def url(self) -> str: ...
    async def start(self) -> None: ...
    async def wait_ready(self, timeout_s: float) -> None: ...
    async def supervise(self) -> None: ...
    async def stop(self, timeout_s: float = 20.0) -> None: ...


# Makes serve's next EngineProcess of a role on a port not in the set; serve imports this module, not
# the reverse.
EngineFactory = Callable[[set[int], Role], EngineLike]


class DesiredReplicasCollector(Collector):
    """`microserve_router_desired_replicas{role}` and `microserve_router_replicas{role}` for an external
    actuator (KEDA, an HPA on external metrics) to follow."""

    def __init__(self, fleet: LocalFleet) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily]:
        desired = GaugeMetricFamily(
            "microserve_router_desired_replicas", "Engines the autoscaler wants, by role.", labels=["role"]
        )
        current = GaugeMetricFamily(
            "microserve_router_replicas", "Engines up or starting, by role.", labels=["role"]
        )
        for role, scaler in self._fleet.scaler.scalers.items():
            have = self._fleet.replicas_of(Role(role))
            want = scaler.desired
            desired.add_metric([role], float(want if want is not None else have))
            current.add_metric([role], float(have))
        yield desired
        yield current


class LocalFleet:
    """Engines owned by `serve` and sized by the autoscaler; `run` until cancelled, then `stop`."""

    def __init__(
        self,
        router: Router,
        scaler: Autoscaler | PoolAutoscaler,
        make_engine: EngineFactory,
        *,
        ready_timeout_s: float,
        interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        handoff: HandoffConfig | None = None,
    ) -> None:
        self.router = router
        if isinstance(scaler, Autoscaler):  # one `both` pool
            pools = PoolAutoscaler({str(Role.BOTH): scaler.config})
            pools.scalers[str(Role.BOTH)] = scaler
            scaler = pools
        self.scaler = scaler
        self.make_engine = make_engine
        self.ready_timeout_s = ready_timeout_s
        self.interval_s = interval_s
        self.clock = clock
        self.handoff = handoff
        self.handoffs: list[HandoffResult] = []
        self.engines: dict[str, EngineLike] = {}  # up (in the router's pool), draining included
        self.starting: dict[str, EngineLike] = {}
        self.draining: set[str] = set()
        self.roles: dict[str, Role] = {}  # every engine's role, starting ones included
        self._tasks: set[asyncio.Task[None]] = set()
        self._supervisors: dict[str, asyncio.Task[None]] = {}
        self.started = 0
        self.stopped = 0

    @property
    def replicas(self) -> int:
        return len(self.engines) - len(self.draining) + len(self.starting)

    def replicas_of(self, role: Role) -> int:
        """Engines of `role` up (not draining) or starting."""
        urls = [*(u for u in self.engines if u not in self.draining), *self.starting]
        return sum(1 for u in urls if self.roles.get(u, Role.BOTH) is role)

    def register_metrics(self) -> None:
        self.router.metrics.registry.register(DesiredReplicasCollector(self))

    def adopt(self, engine: EngineLike, role: Role = Role.BOTH) -> None:
        """An engine serve started (and the router already has): supervised and scaled from now on."""
        self.roles.setdefault(engine.url, role)
        self.engines[engine.url] = engine
        self._supervisors[engine.url] = asyncio.create_task(engine.supervise(), name=f"engine-{engine.index}")

    async def run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(self.interval_s)

    def tick(self) -> None:
        ttft = None
        if any(a.config.ttft_slo_s is not None for a in self.scaler.scalers.values()):
            finished = self.router.recent.latest(len(self.router.recent))  # on the router's wall clock
            ttft = recent_ttft_p99(((f.at, f.ttft_s) for f in finished if f.ttft_s is not None), time.time())
        queued = self.router.admission.queued
        now = self.clock()
        for name, scaler in self.scaler.scalers.items():
            self._tick_pool(Role(name), scaler, queued, ttft, now)

    def _tick_pool(self, role: Role, scaler: Autoscaler, queued: int, ttft: float | None, now: float) -> None:
        pool = self.router.pool
        mine = [pool.get(u) for u in self.engines if u in pool and self.roles.get(u, Role.BOTH) is role]
        starting = sum(1 for u in self.starting if self.roles.get(u) is role)
        # Requests held in the router wait for any pool; each pool sees them all (PD needs both).
        signals = pool_signals(mine, queued, starting, ttft)
        desired = scaler.decide(now, signals)
        current = signals.replicas
        for _ in range(desired - current):
            engine = self.make_engine(self._taken_ports(), role)
            self.roles[engine.url] = role
            self.starting[engine.url] = engine  # counted from now, so the next tick does not start another
            self._spawn(self._start(engine, role, scaler.reason))
        for _ in range(current - desired):
            worker = idlest(w for w in mine if w.url not in self.draining)
            if worker is None:
                break  # the rest are still starting: they join, and go on a later decision
            log.info(
                "autoscale: %s pool %d -> %d engines (%s): draining %s",
                role,
                current,
                desired,
                scaler.reason,
                worker.url,
            )
            self.draining.add(worker.url)
            self.router.drain_worker(worker.url)
            self._spawn(self._retire(worker.url))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _taken_ports(self) -> set[int]:
        return {e.port for e in self.engines.values()} | {e.port for e in self.starting.values()}

    async def _start(self, engine: EngineLike, role: Role, reason: str) -> None:
        log.info("autoscale: starting a %s engine on %s (%s)", role, engine.url, reason)
        try:
            await engine.start()
            await engine.wait_ready(self.ready_timeout_s)
            await self.router.add_worker(WorkerSpec(engine.url, kind=WorkerKind.MICROSERVE, role=role))
        except (RuntimeError, TimeoutError, OSError) as exc:
            log.warning("autoscale: engine on %s did not start: %s", engine.url, exc)
            await engine.stop()
            self.roles.pop(engine.url, None)
            return
        finally:
            self.starting.pop(engine.url, None)
        self.started += 1
        self.adopt(engine, role)
        self.router.admission.wake()  # requests held while no engine was ready start now

    async def _retire(self, url: str) -> None:
        """Stop `url`'s engine once nothing is in flight on it (it takes no new request while draining)."""
        worker = self.router.pool.get(url)
        while worker.in_flight > 0:
            await asyncio.sleep(0.1)
        if self.handoff is not None:
            await self._hand_off(url)
        self.router.remove_worker(url)
        supervisor = self._supervisors.pop(url, None)
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        engine = self.engines.pop(url)
        self.draining.discard(url)
        self.roles.pop(url, None)
        await engine.stop()
        self.stopped += 1
        log.info("autoscale: stopped the engine on %s", url)

    async def _hand_off(self, url: str) -> None:
        """Move the leaving engine's hottest prefixes to the idlest survivor, then point the router there."""
        assert self.handoff is not None
        pool = self.router.pool
        leaving = pool.get(url)
        survivor = idlest(
            w
            for w in pool
            if w.url != url and not w.draining and w.role == leaving.role and w.url in self.engines
        )
        if survivor is None:
            return
        upstream = self.router.upstream
        src = EnginePeer(upstream.engine_client(leaving))
        dst = EnginePeer(upstream.engine_client(survivor))
        result = await hand_off(src, dst, self.handoff, self.clock)
        self.router.policy.handed_off(url, survivor.url, result.prefixes)
        self.handoffs.append(result)
        log.info("autoscale: handed off %s", result.describe())

    async def stop(self) -> None:
        """Cancel scaling and stop every engine (the router has drained its requests before this)."""
        engines = [*self.engines.values(), *self.starting.values()]  # a cancelled start forgets its engine
        for task in [*self._tasks, *self._supervisors.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._supervisors.values(), return_exceptions=True)
        await asyncio.gather(*(e.stop() for e in engines))
