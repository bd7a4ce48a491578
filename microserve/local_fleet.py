"""`serve`'s autoscaling actuator: the autoscaler's decisions, acted on with local engine processes.

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

from microserve.router.autoscaler import Autoscaler, idlest, pool_signals, recent_ttft_p99
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


# Makes serve's next EngineProcess on a port not in the set; serve imports this module, not the reverse.
EngineFactory = Callable[[set[int]], EngineLike]


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
        role = str(Role.BOTH)
        want = self._fleet.scaler.desired
        desired.add_metric([role], float(want if want is not None else self._fleet.replicas))
        current.add_metric([role], float(self._fleet.replicas))
        yield desired
        yield current


class LocalFleet:
    """Engines owned by `serve` and sized by the autoscaler; `run` until cancelled, then `stop`."""

    def __init__(
        self,
        router: Router,
        scaler: Autoscaler,
        make_engine: EngineFactory,
        *,
        ready_timeout_s: float,
        interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        handoff: HandoffConfig | None = None,
    ) -> None:
        self.router = router
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
        self._tasks: set[asyncio.Task[None]] = set()
        self._supervisors: dict[str, asyncio.Task[None]] = {}
        self.started = 0
        self.stopped = 0

    @property
    def replicas(self) -> int:
        return len(self.engines) - len(self.draining) + len(self.starting)

    def register_metrics(self) -> None:
        self.router.metrics.registry.register(DesiredReplicasCollector(self))

    def adopt(self, engine: EngineLike) -> None:
        """An engine serve started (and the router already has): supervised and scaled from now on."""
        self.engines[engine.url] = engine
        self._supervisors[engine.url] = asyncio.create_task(engine.supervise(), name=f"engine-{engine.index}")

    async def run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(self.interval_s)

    def tick(self) -> None:
        ttft = None
        if self.scaler.config.ttft_slo_s is not None:  # the router's recent answers, on its wall clock
            finished = self.router.recent.latest(len(self.router.recent))
            ttft = recent_ttft_p99(((f.at, f.ttft_s) for f in finished if f.ttft_s is not None), time.time())
        signals = pool_signals(self.router.pool, self.router.admission.queued, len(self.starting), ttft)
        desired = self.scaler.decide(self.clock(), signals)
        current = signals.replicas
        for _ in range(desired - current):
            engine = self.make_engine(self._taken_ports())
            self.starting[engine.url] = engine  # counted from now, so the next tick does not start another
            self._spawn(self._start(engine))
        for _ in range(current - desired):
            pool = self.router.pool
            candidates = [pool.get(url) for url in self.engines if url not in self.draining and url in pool]
            worker = idlest(candidates)
            if worker is None:
                break  # the rest are still starting: they join, and go on a later decision
            log.info(
                "autoscale: %d -> %d engines (%s): draining %s",
                current,
                desired,
                self.scaler.reason,
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

    async def _start(self, engine: EngineLike) -> None:
        log.info("autoscale: starting an engine on %s (%s)", engine.url, self.scaler.reason)
        try:
            await engine.start()
            await engine.wait_ready(self.ready_timeout_s)
            await self.router.add_worker(WorkerSpec(engine.url, kind=WorkerKind.MICROSERVE))
        except (RuntimeError, TimeoutError, OSError) as exc:
            log.warning("autoscale: engine on %s did not start: %s", engine.url, exc)
            await engine.stop()
            return
        finally:
            self.starting.pop(engine.url, None)
        self.started += 1
        self.adopt(engine)
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
