"""The simulated router: real `Worker`s in a real `WorkerPool`, the real policy and strategy, sim handles.

`pick` is the router's (pool candidates, then the policy); `serve` retries as the router does before the
first byte, and a load poll on the virtual clock feeds `least_loaded` and `power_of_two`.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from microserve.router.policies import POLICIES, Policy, make_policy
from microserve.router.retry import RetryBudget, RetryConfig, backoff_s
from microserve.router.router import select_worker
from microserve.router.strategies import Strategy, make_strategy
from microserve.router.upstream import WorkerFailure
from microserve.router.workers import NoWorkerAvailable, Role, WorkerKind, WorkerPool, WorkerSpec
from microserve.simulator.handle import SimRequest, SimWorkerHandle
from microserve.simulator.replica import ReplicaConfig, SimReplica

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
        self.pool = WorkerPool()
        self.replicas: dict[str, SimReplica] = {}
        for replica, role in zip(replicas, fleet.roles, strict=True):
            url = f"http://{replica.name}.sim"
            self.pool.add(WorkerSpec(url, role=role, models=(MODEL,)))
            self.replicas[url] = replica
        self.policy = build_policy(fleet.policy, fleet.policy_options, self.rng, loop.time)
        self.strategy: Strategy = make_strategy(fleet.strategy, fleet.strategy_options)
        self.strategy.bind(self)  # type: ignore[arg-type]
        self.retry_budget = RetryBudget(fleet.retry, clock=loop.time)
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.retries = 0
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for replica in self.replicas.values():
            replica.start(loop)
        if self.policy.needs_load:
            self._tasks.append(asyncio.create_task(self._poll_loads()))

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
        req: SimRequest,
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
        handle = SimWorkerHandle(worker, self.replicas[worker.url])
        req.handles.append(handle)
        return handle

    # -- one request --------------------------------------------------------------------------------

    async def serve(self, req: SimRequest) -> None:
        """Run the strategy for `req`, retrying elsewhere on a refusal as the router does before the first
        byte; the request's record says how it went (its `error` stays None on success)."""
        record = req.answer.record
        try:
            async with asyncio.timeout(self.fleet.request_timeout_s):
                await self._attempts(req)
        except TimeoutError:
            record.error = f"timeout after {self.fleet.request_timeout_s:g} s"
        except (WorkerFailure, NoWorkerAvailable) as exc:
            record.error = str(exc)

    async def _attempts(self, req: SimRequest) -> None:
        config = self.fleet.retry
        self.retry_budget.on_request()
        last: WorkerFailure | None = None
        for attempt in range(config.max_attempts):
            if attempt:
                if not self.retry_budget.try_spend():
                    break
                self.retries += 1
                await asyncio.sleep(backoff_s(attempt, config, self.rng))
            try:
                async for _ in self.strategy.serve(req):
                    pass
                return
            except WorkerFailure as exc:
                last = exc
                req.excluded.add(exc.worker.url)
            except NoWorkerAvailable:
                if last is None:
                    raise
                break
            finally:
                for handle in req.handles:
                    handle.release()
                req.handles.clear()
        assert last is not None
        raise last

    async def _poll_loads(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for worker in self.pool:
                waiting, running, kv_usage = self.replicas[worker.url].load()
                worker.report_load(waiting, running, kv_usage, at=now)
            await asyncio.sleep(self.fleet.load_interval_s)

    def replica_stats(self) -> list[dict[str, Any]]:
        """Per replica: role, requests routed to it, engine steps, busy time, preemptions, prefix hits."""
        stats = []
        for worker in self.pool:
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
