"""The Kubernetes actuator against a fake API server's scale subresource: the autoscaler's decisions, per
role, become merge PATCHes of spec.replicas; replicas asked for and not Ready yet count as starting."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from microserve.kube.client import KubeClient
from microserve.kube.config import KubeConfig
from microserve.router.kube_scaler import DeploymentScaler, ScalerCollector, ScaleTarget
from microserve.router.workers import Role, WorkerPool, WorkerSpec
from tests.clocks import Clock
from tests.kube_fake import FakeKubeAPI


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    server = FakeKubeAPI()
    await server.start()
    yield server
    await server.stop()


def scaler(api: FakeKubeAPI, pool: WorkerPool, urls: list[str], queued: list[int] | None = None,
           clock: Clock | None = None, token: str = "") -> DeploymentScaler:  # fmt: skip
    held = queued if queued is not None else [0]
    client = KubeClient(KubeConfig(api.server, token=token or api.token), timeout_s=2.0)
    targets = [ScaleTarget.parse(u) for u in urls]
    return DeploymentScaler(targets, lambda: pool, lambda: held[0], client, clock=clock or Clock())


def add(pool: WorkerPool, n: int, role: str = "both", in_flight: int = 0, first: int = 1) -> None:
    for i in range(first, first + n):
        worker = pool.add(WorkerSpec(f"http://10.0.0.{i}:8100", role=role, models=("m",)))  # type: ignore[arg-type]
        worker.in_flight = in_flight


def test_the_url_names_the_deployment_role_and_bounds() -> None:
    t = ScaleTarget.parse("k8s://serving/engine-decode?role=decode&min=0&max=6&target=4&down-after=30")
    assert (t.namespace, t.deployment, t.role) == ("serving", "engine-decode", Role.DECODE)
    assert (t.config.min_replicas, t.config.max_replicas, t.config.target_load) == (0, 6, 4.0)
    assert t.config.scale_down_after_s == 30.0 and t.patch
    assert not ScaleTarget.parse("k8s://serving/engine?patch=false").patch
    for bad, message in [
        ("k8s://serving", "looks like k8s://NAMESPACE/DEPLOYMENT"),
        ("etcd://serving/engine", "looks like k8s://NAMESPACE/DEPLOYMENT"),
        ("k8s://serving/engine?replicas=3", "unknown --k8s-scale parameter"),
        ("k8s://serving/engine?role=gpu", "role is one of prefill, decode, both, got 'gpu'"),
        ("k8s://serving/engine?min=4&max=2", "min replicas <= max replicas"),
        ("k8s://serving/engine?max=many", "min and max must be integers"),
        ("k8s://serving/engine?patch=maybe", "patch is true or false, got 'maybe'"),
    ]:
        with pytest.raises(ValueError, match=message):
            ScaleTarget.parse(bad)


async def test_load_grows_the_deployment_and_starting_pods_count(api: FakeKubeAPI) -> None:
    api.deployment("engine", 1)
    pool = WorkerPool()
    add(pool, 1, in_flight=20)  # 20 requests on one replica, 8 per replica wanted: 3 replicas
    s = scaler(api, pool, ["k8s://serving/engine?max=4&up-cooldown=0"])
    try:
        await s.tick()
        assert api.patches == [("engine", 3)] and api.deployments[("serving", "engine")] == 3
        await s.tick()  # two pods still starting (not Ready, not in the pool): counted, not asked again
        assert api.patches == [("engine", 3)] and s.replicas == {Role.BOTH: 3}
        assert any(r.startswith("PATCH /apis/apps/v1/namespaces/serving/deployments/engine/scale")
                   for r in api.requests)  # fmt: skip
    finally:
        await s.close()


async def test_low_load_shrinks_the_deployment_after_a_wait(api: FakeKubeAPI) -> None:
    api.deployment("engine", 3)
    pool, clock = WorkerPool(), Clock()
    add(pool, 3)
    busy = pool.get("http://10.0.0.1:8100")
    busy.in_flight = 5  # at half the target of 8, two replicas' worth
    s = scaler(api, pool, ["k8s://serving/engine?min=1&max=4&down-after=10"], clock=clock)
    try:
        await s.tick()  # low from now on
        clock.now = 5
        await s.tick()
        assert api.patches == []  # not low for long enough yet
        clock.now = 10
        await s.tick()
        assert api.patches == [("engine", 2)]  # what the load needs, not fewer
        pool.get("http://10.0.0.3:8100").draining = True  # its pod terminating: discovery drains it
        clock.now = 30
        await s.tick()
        assert api.patches == [("engine", 2)]  # 5 requests do not fit in one at half the target
        busy.in_flight = 0
        await s.tick()  # idle from now on
        clock.now = 40
        await s.tick()
        assert api.patches == [("engine", 2), ("engine", 1)]
        clock.now = 100
        await s.tick()
        assert api.patches[-1] == ("engine", 1) and len(api.patches) == 2  # never below min
    finally:
        await s.close()


async def test_each_role_has_its_own_deployment(api: FakeKubeAPI) -> None:
    api.deployment("prefill", 1)
    api.deployment("decode", 1)
    pool = WorkerPool()
    add(pool, 1, role="prefill", in_flight=1)
    add(pool, 1, role="decode", in_flight=30, first=2)
    urls = ["k8s://serving/prefill?role=prefill&max=4", "k8s://serving/decode?role=decode&max=4"]
    s = scaler(api, pool, urls)
    try:
        await s.tick()
        assert api.patches == [("decode", 4)]
        assert s.replicas == {Role.PREFILL: 1, Role.DECODE: 4}
    finally:
        await s.close()
    with pytest.raises(ValueError, match="one scaled Deployment per role"):
        scaler(api, pool, ["k8s://serving/a", "k8s://serving/b"])


async def test_a_request_held_scales_from_zero(api: FakeKubeAPI) -> None:
    api.deployment("engine", 0)
    queued = [0]
    s = scaler(api, WorkerPool(), ["k8s://serving/engine?min=0&max=2"], queued=queued)
    try:
        await s.tick()
        assert api.patches == []  # nothing asked, nothing started
        queued[0] = 1
        await s.tick()
        assert api.patches == [("engine", 1)]
    finally:
        await s.close()


async def test_without_patch_the_decision_is_only_exported(api: FakeKubeAPI) -> None:
    api.deployment("engine", 1)
    pool = WorkerPool()
    add(pool, 1, in_flight=20)
    s = scaler(api, pool, ["k8s://serving/engine?max=4&up-cooldown=0&patch=false"])
    registry = CollectorRegistry()
    registry.register(ScalerCollector(s))
    try:
        await s.tick()
        assert api.patches == [] and api.deployments[("serving", "engine")] == 1
        assert api.used == {("apps", "deployments/scale", "get")}  # what the Role needs for KEDA's mode
        assert registry.get_sample_value("microserve_router_desired_replicas", {"role": "both"}) == 3
        assert registry.get_sample_value("microserve_router_replicas", {"role": "both"}) == 1
        api.deployments[("serving", "engine")] = 3  # KEDA applied it
        await s.tick()
        assert registry.get_sample_value("microserve_router_replicas", {"role": "both"}) == 3
    finally:
        await s.close()


async def test_api_errors_are_kept_and_cleared(api: FakeKubeAPI) -> None:
    s = scaler(api, WorkerPool(), ["k8s://serving/missing"])
    try:
        await s.tick()
        assert s.error is not None and "404" in s.error and 'deployments.apps "missing" not found' in s.error
        api.deployment("missing", 1)
        await s.tick()
        assert s.error is None and s.replicas == {Role.BOTH: 1}
    finally:
        await s.close()
    denied = scaler(api, WorkerPool(), ["k8s://serving/missing"], token="wrong")
    try:
        await denied.tick()
        assert denied.error is not None and "401" in denied.error
    finally:
        await denied.close()


def test_the_router_config_refuses_bad_targets_before_starting() -> None:
    from microserve.router.config import RouterConfig

    with pytest.raises(ValueError, match="kubeconfig /nonexistent/kubeconfig"):
        RouterConfig(k8s_scale=["k8s://serving/engine?kubeconfig=/nonexistent/kubeconfig"])
    with pytest.raises(ValueError, match="one scaled Deployment per role"):
        RouterConfig(k8s_scale=["k8s://serving/a?role=decode", "k8s://serving/b?role=decode"])
