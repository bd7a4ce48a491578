"""The simulated router: real `Worker`s in a real `WorkerPool`, the real policy and strategy, sim handles.

`pick` is the router's (pool candidates, then the policy); `serve` runs the router's own retry loop and,
when configured, its admission queue and per-attempt deadlines, all on the virtual clock; a load poll
feeds `least_loaded`, `power_of_two`, the deadlines and admission's capacity.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from microserve.api.errors import APIError
from microserve.router.admission import AdmissionConfig, AdmissionQueue, pool_capacity
from microserve.router.attempts import RetryLoop
from microserve.router.deadlines import DeadlineConfig
from microserve.router.discovery.membership import Membership
from microserve.router.fair_share import FairShare, admit
from microserve.router.policies import POLICIES, Policy, make_policy
from microserve.router.request import RoutedRequest
from microserve.router.retry import RetryBudget, RetryConfig
from microserve.router.router import select_worker
from microserve.router.strategies import Strategy, make_strategy
from microserve.router.upstream import WorkerFailure
from microserve.router.workers import NoWorkerAvailable, Role, Worker, WorkerKind, WorkerPool, WorkerSpec
from microserve.simulator.handle import SimRequest, SimWorkerHandle
from microserve.simulator.replica import ReplicaConfig, SimReplica

if TYPE_CHECKING:
    from microserve.bench.sender import RequestRecord
    from microserve.simulator.scaling import SimScaling

MODEL = "sim"  # the one model every simulated replica serves


def parse_roles(text: str, replicas: int | None) -> tuple[Role, ...]:
    """'both' (with a replica count) or 'prefill:2,decode:6' -> one role per replica, in order."""
    text = text.strip()
    if ":" not in text:
        role = Role(text)
        return (role,) * (replicas if replicas is not None else 1)
    roles: list[Role] = []
    for part in text.split(","):
        name, _, count = part.partition(":")
        try:
            n = int(count)
        except ValueError:
            raise ValueError(
                f"--roles takes ROLE:COUNT pairs like prefill:2,decode:6, got {part!r}"
            ) from None
        if n < 1:
            raise ValueError(f"--roles counts must be positive, got {part!r}")
        roles += [Role(name.strip())] * n
    if replicas is not None and replicas != len(roles):
        raise ValueError(f"--roles names {len(roles)} replicas but --replicas is {replicas}")
    return tuple(roles)


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """The simulated fleet: one role per replica, what each replica is, and how the router routes."""

    roles: tuple[Role, ...]
    replica: ReplicaConfig
    strategy: str = "data_parallel"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    policy: str = "round_robin"
    policy_options: dict[str, Any] = field(default_factory=dict)
    load_interval_s: float = 0.5  # the router's /load poll, for the policies that read load
    request_timeout_s: float = 600.0
    retry: RetryConfig = field(default_factory=RetryConfig)
    # The router's admission queue and per-attempt deadlines; off unless given, so that a simulation
    # measures the engines' own queueing as before.
    admission: AdmissionConfig | None = None
    deadlines: DeadlineConfig | None = None
    autoscale: SimScaling | None = None  # the autoscaler sizes the fleet (admission holds requests meanwhile)
    fair_share: bool = True  # within a priority class, tenants share the admission queue fairly (else FIFO)

    def __post_init__(self) -> None:
        if not self.roles:
            raise ValueError("the fleet needs at least one replica")
        make_strategy(self.strategy, self.strategy_options)  # fail now, with the router's message
        make_policy(self.policy, self.policy_options)
        if self.load_interval_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("the load interval and the request timeout must be positive")

    def describe(self) -> dict[str, Any]:
        return {
            "replicas": len(self.roles),
            "roles": dict(Counter(str(r) for r in self.roles)),
            "strategy": {"name": self.strategy, "options": self.strategy_options},
            "policy": {"name": self.policy, "options": self.policy_options},
            "num_kv_blocks": self.replica.num_blocks,
            "block_size": self.replica.block_size,
            "max_num_seqs": self.replica.max_num_seqs,
            "max_num_batched_tokens": self.replica.max_num_batched_tokens,
            "max_model_len": self.replica.max_model_len,
            "transfer_bandwidth_bytes_per_s": self.replica.cost.transfer_bandwidth_bytes_per_s,
            "load_interval_s": self.load_interval_s,
        }


def build_policy(
    name: str, options: dict[str, Any], rng: random.Random, clock: Callable[[], float]
) -> Policy:
    """The registry's policy, given the simulation's seeded rng and virtual clock where it takes them."""
    make_policy(name, options)  # the registry's checks and messages
    cls = POLICIES[name]
    accepted = inspect.signature(cls.__init__).parameters
    internal = {k: v for k, v in (("rng", rng), ("clock", clock)) if k in accepted}
    return cls(**options, **internal)


class SimRouter:
    """The StrategyHost of a simulation. Create it inside the virtual loop; `start` the replicas."""

    def __init__(self, fleet: FleetConfig, replicas: list[SimReplica], seed: int = 0) -> None:
        if len(replicas) != len(fleet.roles):
            raise ValueError("one replica per role is needed")
        loop = asyncio.get_running_loop()
        self.fleet = fleet
        self.rng = random.Random(seed)
        self.pool = WorkerPool(clock=loop.time)
        self.replicas: dict[str, SimReplica] = {}
        self.retired: list[Worker] = []  # replicas an autoscaler stopped, for the stats
        for replica, role in zip(replicas, fleet.roles, strict=True):
            url = f"http://{replica.name}.sim"
            self.pool.add(WorkerSpec(url, role=role, models=(MODEL,)))
            self.replicas[url] = replica
        self.policy = build_policy(fleet.policy, fleet.policy_options, self.rng, loop.time)
        self.strategy: Strategy = make_strategy(fleet.strategy, fleet.strategy_options)
        self.strategy.bind(self)
        self.retry_budget = RetryBudget(fleet.retry, clock=loop.time)
        self.retry_loop = RetryLoop(fleet.retry, self.retry_budget, self.rng, on_retry=self._count_retry)
        self.admission: AdmissionQueue | None = None
        self.fair_share = FairShare(enabled=fleet.fair_share)
        if fleet.admission is not None:
            per_worker = fleet.admission.per_worker
            capacity = lambda: pool_capacity(self.pool, per_worker, self.strategy.roles)  # noqa: E731
            self.admission = AdmissionQueue(fleet.admission, capacity, loop.time)
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.retries = 0
        # Replicas an autoscaler starts register here and join through the router's membership code;
        # those of the fleet's configuration are static, as workers named by flags.
        self.registered: dict[str, WorkerSpec] = {}
        self.membership = Membership(self.pool, "simulator", drain_timeout_s=math.inf)
        # (when, seconds) of recent first tokens, for the autoscaler's TTFT signal; and the requests
        # still waiting for theirs (id -> start), whose wait so far counts too.
        self.ttfts: deque[tuple[float, float]] = deque(maxlen=4096)
        self.pending: dict[int, RequestRecord] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for replica in self.replicas.values():
            replica.start(loop)
        if self.policy.needs_load or self.admission is not None or self.fleet.deadlines is not None:
            self._tasks.append(asyncio.create_task(self._poll_loads()))

    def add_replica(self, url: str, replica: SimReplica, role: Role) -> None:
        """A replica joins (an autoscaler started it and it registered): the router's membership code adds
        it to the pool, as for an engine registering in etcd; it is ready at once (no health check runs
        here), stepping from now."""
        loop = asyncio.get_running_loop()
        self.registered[url] = WorkerSpec(url, role=role, models=(MODEL,))
        self.replicas[url] = replica
        for worker in self.membership.apply(list(self.registered.values()), loop.time()).joined:
            worker.healthy = True  # its first health check, passed
        replica.start(loop)
        if self.admission is not None:
            self.admission.wake()

    def retire_replica(self, url: str) -> None:
        """A drained, idle replica withdraws its registration: membership drains it and takes it out of
        the pool (one of the fleet's configured replicas is removed as a static worker is), and it stops;
        its stats stay."""
        now = asyncio.get_running_loop().time()
        if self.registered.pop(url, None) is None:  # one of the fleet's own replicas: static, removed
            self.retired.append(self.pool.remove(url))
            self.replicas[url].stop()
            return
        self.membership.apply(list(self.registered.values()), now)
        for worker in self.membership.sweep(now):
            self.retired.append(worker)
            self.replicas[worker.url].stop()

    async def stop(self) -> None:
        for replica in self.replicas.values():
            replica.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- StrategyHost -------------------------------------------------------------------------------

    def pick(
        self,
        role: Role,
        req: RoutedRequest,
        kind: WorkerKind | None = None,
        *,
        exclude_picked: bool = False,
        least_busy: bool = False,
    ) -> SimWorkerHandle:
        """As `Router.pick`, over in-process replicas."""
        worker = select_worker(
            self.pool,
            self.policy,
            self.decisions,
            role,
            req,
            kind,
            exclude_picked=exclude_picked,
            least_busy=least_busy,
        )
        handle = SimWorkerHandle(worker, self.replicas[worker.url], self.fleet.deadlines)
        req.handles.append(handle)
        return handle

    # -- one request --------------------------------------------------------------------------------

    async def serve(self, req: SimRequest) -> None:
        """Run the strategy for `req`, retrying elsewhere on a refusal as the router does before the first
        byte; the request's record says how it went (its `error` stays None on success)."""
        record = req.answer.record
        admission = self.admission
        granted: int | None = None  # the admission ticket
        self.pending[id(req)] = record
        try:
            async with asyncio.timeout(self.fleet.request_timeout_s):
                if admission is not None:
                    cost = len(req.prompt_ids) + req.params.max_tokens
                    granted = await admit(
                        self.fair_share, admission, req.tenant, req.rank, cost, req.remaining_s()
                    )
                self.retry_budget.on_request()
                await self.retry_loop.run(req, lambda: self._attempt(req))
        except TimeoutError:
            record.error = f"timeout after {self.fleet.request_timeout_s:g} s"
        except (WorkerFailure, NoWorkerAvailable) as exc:
            record.error = str(exc)
        except APIError as exc:  # refused by admission (429, or 503 while no replica is ready)
            record.error = f"{exc.status}: {exc.message}"
        finally:
            del self.pending[id(req)]
            if record.chunk_times:
                self.ttfts.append((record.chunk_times[0], record.chunk_times[0] - record.start))
            if admission is not None and granted is not None:
                admission.release(granted)
                self.fair_share.running(req.tenant, -1)

    async def _attempt(self, req: SimRequest) -> None:
        try:
            if req.stream:
                async for _ in self.strategy.serve(req):
                    pass
            else:  # as the router answers a whole one
                await self.strategy.serve_whole(req)
        finally:
            for handle in req.handles:
                handle.release()
            req.handles.clear()

    def _count_retry(self) -> None:
        self.retries += 1

    async def _poll_loads(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for worker in self.pool:
                replica = self.replicas[worker.url]
                if replica.frozen:
                    continue  # a hung engine answers no poll: its last report goes stale
                waiting, running, kv_usage = replica.load()
                worker.report_load(
                    waiting,
                    running,
                    kv_usage,
                    at=now,
                    step_s=replica.core.step_s or None,
                    max_num_seqs=replica.config.max_num_seqs,
                )
            await asyncio.sleep(self.fleet.load_interval_s)

    def ttft_samples(self, now: float) -> list[tuple[float, float]]:
        """Recent TTFTs, and the waits so far of requests without a first token yet (a lower bound)."""
        waits = ((now, now - r.start) for r in self.pending.values() if not r.chunk_times)
        return [*self.ttfts, *waits]

    def replica_stats(self) -> list[dict[str, Any]]:
        """Per replica: role, requests routed to it, engine steps, busy time, preemptions, prefix hits."""
        stats = []
        for worker in [*self.pool, *self.retired]:
            replica = self.replicas[worker.url]
            core = replica.core
            stats.append(
                {
                    "name": replica.name,
                    "role": str(worker.role),
                    "requests": worker.requests,
                    "steps": core.num_steps,
                    "busy_s": replica.busy_s,
                    "preemptions": core.scheduler.num_preemptions,
                    "prefix_hit_rate": core.kv.prefix_hit_rate,
                    "kv_blocks_free": core.kv.num_free_blocks,
                    "kv_blocks_total": core.kv.num_blocks,
                    # Left behind when the run ended: requests, prefills and reservations (all 0 normally).
                    "left_in_engine": len(core.requests) + len(core.prefills) + len(core.reservations),
                }
            )
        return stats
