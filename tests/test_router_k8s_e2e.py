"""Kubernetes end to end with real sim engines (no cluster here: tests/kube_fake.py plays the API server
and the test plays the Deployment controller): a router follows the engines' pods, scales their
Deployment up under load, takes in the new pod once Ready, and drains a deleted pod with no request
failed."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from microserve.processes import ManagedProcess, free_port
from microserve.router.config import RouterConfig
from microserve.router.health import HealthConfig
from microserve.router.router import Router
from microserve.router.workers import Role
from tests.kube_fake import FakeKubeAPI, make_pod
from tests.router_fakes import serving
from tests.test_router_discovery_e2e import complete, wait_for, write_profile

pytestmark = pytest.mark.slow

RBAC = Path(__file__).parent.parent / "deploy" / "kubernetes" / "rbac.yaml"


def sim_engine(profile: Path) -> ManagedProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
           "--sim-profile", str(profile), "--port", str(port), "--threads", "1"]  # fmt: skip
    return ManagedProcess(cmd, f"http://127.0.0.1:{port}")


def pod(name: str, engine: ManagedProcess, ready: bool = True) -> dict[str, object]:
    port = int(engine.url.rsplit(":", 1)[1])
    return make_pod(name, "127.0.0.1", port=port, ready=ready)


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    server = FakeKubeAPI(rbac=RBAC)
    await server.start()
    yield server
    await server.stop()


async def test_pods_of_sim_engines_scale_up_and_drain(api: FakeKubeAPI, tmp_path: Path) -> None:
    profile = write_profile(tmp_path / "profile.json")
    engines = [sim_engine(profile) for _ in range(2)]
    try:
        for engine in engines:
            await asyncio.to_thread(engine.wait_ready, 180)
        first, second = engines
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        api.deployment("engine", 1)
        await api.put(pod("engine-1", first))
        config = RouterConfig(
            discovery=[f"k8s://serving?selector=app%3Dengine&kubeconfig={kubeconfig}"],
            k8s_scale=[f"k8s://serving/engine?min=1&max=2&target=1&up-cooldown=0&kubeconfig={kubeconfig}"],
            health=HealthConfig(interval_s=0.2, timeout_s=1.0),
        )
        router = Router(config)
        async with serving(router) as client:
            assert [w.url for w in router.pool] == [first.url]
            assert router.k8s_scaler is not None
            router.k8s_scaler.interval_s = 0.2

            # Load on one replica at a target of one request each: the Deployment is asked for two.
            load = [asyncio.create_task(complete(client, i, max_tokens=60)) for i in range(3)]
            await wait_for(lambda: ("engine", 2) in api.patches, "a step up", timeout=30)
            await api.put(pod("engine-2", second, ready=False))  # the controller's new pod, starting
            await asyncio.sleep(0.5)
            assert [w.url for w in router.pool] == [first.url]  # not Ready: not a worker
            await api.put(pod("engine-2", second))
            await wait_for(lambda: {w.url for w in router.pool if w.available} == {first.url, second.url},
                           "the new pod in rotation", timeout=30)  # fmt: skip
            await asyncio.gather(*load)

            # The first pod is deleted under load: it drains, everything in flight finishes.
            load = [asyncio.create_task(complete(client, 10 + i, max_tokens=40)) for i in range(4)]
            await asyncio.sleep(0.3)
            await api.delete("engine-1")
            await asyncio.gather(*load)  # each asserts a 200 with all its tokens
            await wait_for(lambda: [w.url for w in router.pool] == [second.url], "the deleted pod gone", 30)
            await complete(client, 20)
            assert router.k8s_scaler.replicas[Role.BOTH] >= 1 and router.k8s_scaler.error is None
    finally:
        for engine in engines:
            await asyncio.to_thread(engine.stop)
