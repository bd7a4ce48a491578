"""The shared-state interface: which implementation a URL makes, the metrics and /ready in each mode."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from microserve.router.config import RouterConfig
from microserve.router.redis_state import RedisState
from microserve.router.router import Router
from microserve.router.shared_state import LocalState, Mode, SharedStateCollector, make_shared_state
from microserve.router.workers import WorkerKind, WorkerSpec
from tests.router_fakes import fakes, serving


def test_make_shared_state_checks_the_url() -> None:
    assert isinstance(make_shared_state(None), LocalState)
    assert make_shared_state(None).describe() == {"mode": "local", "replicas": 1}
    assert isinstance(make_shared_state("redis://127.0.0.1:6379/2"), RedisState)
    with pytest.raises(ValueError, match="redis://"):
        make_shared_state("etcd://127.0.0.1:2379")
    with pytest.raises(ValueError, match="--shared-state takes redis://"):
        RouterConfig(shared_state="localhost:6379")


@pytest.mark.parametrize(("mode", "up"), [(Mode.LOCAL, 0), (Mode.SHARED, 1), (Mode.DEGRADED, 0)])
def test_the_metrics_say_the_mode(mode: Mode, up: int) -> None:
    state = LocalState()
    state.mode = mode
    registry = CollectorRegistry()
    registry.register(SharedStateCollector(state))
    text = generate_latest(registry).decode()
    assert f"microserve_router_shared_state_up {up}.0" in text
    for m in Mode:
        assert f'microserve_router_shared_state_mode{{mode="{m}"}} {1 if m is mode else 0}.0' in text
    assert "microserve_router_shared_state_replicas 1.0" in text


async def test_ready_says_local_without_the_flag() -> None:
    async with fakes(1) as servers:
        router = Router(RouterConfig(workers=[WorkerSpec(servers[0].url, kind=WorkerKind.OPENAI)]))
        async with serving(router) as client:
            body = await (await client.get("/ready")).json()
    assert body["ready"] is True
    assert body["shared_state"] == {"mode": "local", "replicas": 1}
