"""What router replicas share so that they route as one: the prefix index, requests in flight per worker
and circuit-breaker state. `LocalState` keeps it in this process (one router, the default);
`redis_state.RedisState` shares it through Redis (`--shared-state redis://…`).

Requests never wait on the shared state: a replica routes on its local copy, which a background loop
keeps in step with the others, and which simply stops being refreshed while Redis cannot be reached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from microserve.router.policies import Policy
from microserve.router.workers import WorkerPool

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class Mode(StrEnum):
    LOCAL = "local"  # no shared state configured: this router alone
    SHARED = "shared"  # in step with the other replicas through Redis
    DEGRADED = "degraded"  # shared state configured but unreachable: routing on local state


class SharedState:
    """The in-process state (nothing to share); the interface the Redis one implements."""

    mode: Mode = Mode.LOCAL

    def bind(self, pool: Callable[[], WorkerPool], policy: Callable[[], Policy]) -> None:
        """The router's pool and current policy, read by the background loop (the policy may change)."""

    async def start(self) -> None:
        """Begin synchronising (returns at once; an unreachable store only means degraded mode)."""

    async def close(self) -> None:
        pass

    @property
    def replicas(self) -> int:
        """Router replicas seen sharing this state, this one included."""
        return 1

    def describe(self) -> dict[str, Any]:
        return {"mode": str(self.mode), "replicas": self.replicas}


LocalState = SharedState


def make_shared_state(source: str | None) -> SharedState:
    """None: in-process; `redis://HOST:PORT[/db]` (or rediss://, unix://): shared through Redis."""
    if source is None:
        return LocalState()
    if not source.startswith(REDIS_SCHEMES):
        raise ValueError(f"--shared-state takes redis://HOST:PORT[/db], not {source!r}")
    from microserve.router.redis_state import RedisState  # only a router given Redis needs the client

    return RedisState(source)


class SharedStateCollector:
    """`microserve_router_shared_state_up` (1 while in step with Redis) and the mode, at scrape time."""

    def __init__(self, state: SharedState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state
        yield GaugeMetricFamily(
            "microserve_router_shared_state_up",
            "1 while this router is in step with the shared state (Redis); 0 when local or degraded.",
            value=1 if state.mode is Mode.SHARED else 0,
        )
        mode = GaugeMetricFamily(
            "microserve_router_shared_state_mode",
            "The shared-state mode (1 for the current one): local, shared or degraded.",
            labels=["mode"],
        )
        for m in Mode:
            mode.add_metric([str(m)], 1 if state.mode is m else 0)
        yield mode
        yield GaugeMetricFamily(
            "microserve_router_shared_state_replicas",
            "Router replicas seen sharing state, this one included.",
            value=state.replicas,
        )
