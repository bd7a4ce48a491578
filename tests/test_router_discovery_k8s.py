"""Kubernetes discovery against a fake API server speaking the real list/watch protocol (no cluster here):
Ready pods only, joins, IP changes, deletions, watches resumed at their timeout, 410 Gone (as an event and
as an HTTP status) answered with a relist, and an API server restart riding on the last membership."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from microserve.cli import build_parser
from microserve.kube.client import KubeClient
from microserve.kube.config import KubeConfig
from microserve.router.config import RouterConfig, config_from_args
from microserve.router.discovery import make_discovery
from microserve.router.discovery.k8s import KubernetesDiscovery, pod_ready, pod_worker
from microserve.router.health import HealthConfig
from microserve.router.router import Router
from microserve.router.workers import Role, WorkerSpec
from tests.kube_fake import FakeKubeAPI, make_pod, role_rules, set_ready
from tests.router_fakes import fakes, serving

WAIT_S = 10.0


def test_a_pod_is_a_worker_only_while_ready() -> None:
    pod = make_pod("a", "10.0.0.1")
    assert pod_ready(pod)
    set_ready(pod, False)
    assert pod_worker(pod) is None
    set_ready(pod, True)
    pod["status"]["phase"] = "Pending"
    assert pod_worker(pod) is None
    pod["status"]["phase"] = "Running"
    pod["metadata"]["deletionTimestamp"] = "2026-12-03T18:00:00Z"  # terminating: no new requests
    assert pod_worker(pod) is None
    del pod["metadata"]["deletionTimestamp"]
    del pod["status"]["podIP"]
    assert pod_worker(pod) is None


def test_role_weight_models_and_port_come_from_the_pod() -> None:
    pod = make_pod("a", "10.0.0.1", labels={"app": "engine", "microserve.io/role": "prefill"},
                   annotations={"microserve.io/weight": "3", "microserve.io/models": "m1, m2"})  # fmt: skip
    spec = pod_worker(pod)
    assert spec == WorkerSpec("http://10.0.0.1:8100", role=Role.PREFILL, weight=3, models=("m1", "m2"),
                              labels={"app": "engine", "microserve.io/role": "prefill"})  # fmt: skip
    assert pod_worker(pod, port=9000).url == "http://10.0.0.1:9000"  # type: ignore[union-attr]  # the URL's port
    pod["metadata"]["annotations"]["microserve.io/port"] = "9100"  # the pod's own port wins
    assert pod_worker(pod, port=9000).url == "http://10.0.0.1:9100"  # type: ignore[union-attr]
    assert pod_worker(make_pod("b", "fd00::7")).url == "http://[fd00::7]:8100"  # type: ignore[union-attr]
    pod["metadata"]["annotations"]["microserve.io/weight"] = "heavy"
    with pytest.raises(ValueError, match="weight must be an integer"):
        pod_worker(pod)


def test_the_url_names_namespace_selector_port_and_config(tmp_path: Path) -> None:
    api = FakeKubeAPI()
    config = api.kubeconfig(tmp_path / "kubeconfig")
    source = make_discovery(f"k8s://serving?selector=app%3Dengine,tier%3Dgpu&port=8200&kubeconfig={config}")
    assert isinstance(source, KubernetesDiscovery)
    assert (source.namespace, source.selector, source.port) == ("serving", "app=engine,tier=gpu", 8200)
    assert source.client.config.server == api.server and source.client.config.bearer() == api.token
    for bad, message in [
        ("k8s://", "looks like k8s://NAMESPACE"),
        ("k8s://serving/pods", "looks like k8s://NAMESPACE"),
        (f"k8s://serving?selector=a&kubeconfig={config}&colour=blue", "unknown k8s:// parameter"),
        (f"k8s://serving?port=http&kubeconfig={config}", "must be integers"),
        (f"k8s://serving?port=70000&kubeconfig={config}", "0 < port < 65536"),
        ("k8s://serving?kubeconfig=/nonexistent/kubeconfig", "kubeconfig /nonexistent/kubeconfig"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_discovery(bad)


def test_in_cluster_config_reads_the_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "namespace").write_text("serving")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    config = KubeConfig.in_cluster(tmp_path)
    assert (config.server, config.bearer(), config.namespace) == (
        "https://10.96.0.1:443",
        "sa-token",
        "serving",
    )
    assert config.ca_file == str(tmp_path / "ca.crt")
    (tmp_path / "token").write_text("rotated")  # projected tokens rotate: read on each request
    assert config.bearer() == "rotated"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(ValueError, match="not in a cluster"):
        KubeConfig.in_cluster(tmp_path)


class Follower:
    """The source's watch run in a task, each membership it yields queued as sorted URLs."""

    def __init__(self, source: KubernetesDiscovery) -> None:
        self.source = source
        self.sets: asyncio.Queue[list[str]] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for specs in self.source.watch():
            self.sets.put_nowait(sorted(s.url for s in specs))

    async def next(self) -> list[str]:
        return await asyncio.wait_for(self.sets.get(), WAIT_S)

    async def until(self, urls: list[str]) -> None:
        while (got := await self.next()) != sorted(urls):
            pass
        assert got == sorted(urls)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.source.close()


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    server = FakeKubeAPI()
    await server.start()
    yield server
    await server.stop()


def follow(api: FakeKubeAPI, selector: str = "app=engine", timeout: int = 60, token: str = "") -> Follower:
    config = KubeConfig(api.server, token=token or api.token)
    client = KubeClient(config, timeout_s=2.0)
    return Follower(KubernetesDiscovery("k8s://serving", "serving", selector, client, port=8100,
                                        watch_timeout_s=timeout, retry_s=0.1))  # fmt: skip


async def test_ready_pods_join_change_ip_and_leave(api: FakeKubeAPI) -> None:
    await api.put(make_pod("a", "10.0.0.1"))
    await api.put(make_pod("b", "10.0.0.2", ready=False))  # starting: not a worker yet
    await api.put(make_pod("other", "10.0.0.9", labels={"app": "web"}))  # not matched by the selector
    await api.put(make_pod("elsewhere", "10.0.0.8", namespace="default"))
    f = follow(api)
    try:
        assert await f.next() == ["http://10.0.0.1:8100"]
        assert f.source.status.connected and f.source.settled.is_set()
        b = make_pod("b", "10.0.0.2")
        await api.put(b)  # Ready now
        assert await f.next() == ["http://10.0.0.1:8100", "http://10.0.0.2:8100"]
        await api.put(make_pod("b", "10.0.0.3"))  # rescheduled with a new IP: the old URL goes
        assert await f.next() == ["http://10.0.0.1:8100", "http://10.0.0.3:8100"]
        await api.put(make_pod("a", "10.0.0.1", ready=False))  # failing its readiness probe
        assert await f.next() == ["http://10.0.0.3:8100"]
        await api.put(make_pod("a", "10.0.0.1"))
        assert await f.next() == ["http://10.0.0.1:8100", "http://10.0.0.3:8100"]
        await api.delete("b")
        assert await f.next() == ["http://10.0.0.1:8100"]
        await api.put(make_pod("other", "10.0.0.10", labels={"app": "web"}))  # unseen: nothing yielded
        await api.put(make_pod("a", "10.0.0.1", annotations={"microserve.io/weight": "2"}))
        assert await f.next() == ["http://10.0.0.1:8100"]  # the same URL, its weight changed
        assert [s.weight for s in f.source.pods.values()] == [2]
        assert api.lists == 1 and f.source.relists == 1
        assert all("labelSelector=app%3Dengine" in r for r in api.requests)
    finally:
        await f.stop()


async def test_a_watch_that_ends_is_resumed_from_its_version(api: FakeKubeAPI) -> None:
    await api.put(make_pod("a", "10.0.0.1"))
    f = follow(api, timeout=1)  # the server ends each watch after a second
    try:
        assert await f.next() == ["http://10.0.0.1:8100"]
        while api.watches < 3:
            await asyncio.sleep(0.1)
        await api.put(make_pod("b", "10.0.0.2"))
        assert await f.next() == ["http://10.0.0.1:8100", "http://10.0.0.2:8100"]
        assert api.lists == 1  # resumed, never listed again
        assert f.source.status.connected
    finally:
        await f.stop()


@pytest.mark.parametrize("as_event", [True, False], ids=["error-event", "http-410"])
async def test_gone_leads_to_a_relist(api: FakeKubeAPI, as_event: bool) -> None:
    api.gone_as_event = as_event
    await api.put(make_pod("a", "10.0.0.1"))
    f = follow(api, timeout=1)
    try:
        assert await f.next() == ["http://10.0.0.1:8100"]
        while api.watches < 1:
            await asyncio.sleep(0.05)
        api.compact()  # the watch's version is no longer kept: resumed at its end, it is Gone
        while f.source.relists < 2:
            await asyncio.sleep(0.05)
        assert await f.next() == ["http://10.0.0.1:8100"]  # the relist's set
        assert f.source.expired == 1 and api.lists == 2 and f.source.status.connected
        await api.put(make_pod("b", "10.0.0.2"))  # followed again
        assert await f.next() == ["http://10.0.0.1:8100", "http://10.0.0.2:8100"]
    finally:
        await f.stop()


async def test_a_cut_watch_is_relisted_at_once(api: FakeKubeAPI) -> None:
    await api.put(make_pod("a", "10.0.0.1"))
    f = follow(api)
    try:
        assert await f.next() == ["http://10.0.0.1:8100"]
        while api.watches < 1:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # a watch running for a while (the retry period)
        since = f.source.status.since
        await api.drop_watches()  # cut, e.g. by a proxy: what changes meanwhile is listed again
        await api.put(make_pod("b", "10.0.0.2"))
        await f.until(["http://10.0.0.1:8100", "http://10.0.0.2:8100"])
        assert f.source.cuts == 1 and f.source.expired == 0
        assert f.source.status.connected and f.source.status.since == since  # never reported down
    finally:
        await f.stop()


async def test_an_api_server_restart_keeps_the_last_membership(api: FakeKubeAPI) -> None:
    await api.put(make_pod("a", "10.0.0.1"))
    f = follow(api)
    try:
        assert await f.next() == ["http://10.0.0.1:8100"]
        await api.stop()
        while "127.0.0.1" not in (f.source.status.error or ""):  # the watch cut, then lists refused
            await asyncio.sleep(0.05)
        assert not f.source.status.connected
        assert f.sets.empty()  # nothing yielded: the router keeps serving what it had
        await api.put(make_pod("b", "10.0.0.2"))  # changed while down
        api.compact()
        await api.start()
        assert await f.next() == ["http://10.0.0.1:8100", "http://10.0.0.2:8100"]
        assert f.source.status.connected and f.source.status.error is None
    finally:
        await f.stop()


async def test_a_wrong_token_is_reported(api: FakeKubeAPI) -> None:
    f = follow(api, token="not-the-token")
    try:
        await asyncio.wait_for(f.source.settled.wait(), WAIT_S)
        assert not f.source.status.connected
        assert "401" in (f.source.status.error or "")
    finally:
        await f.stop()


async def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def engine_pod(name: str, url: str, ready: bool = True) -> dict[str, Any]:
    port = int(url.rsplit(":", 1)[1])
    return make_pod(name, "127.0.0.1", port=port, ready=ready, annotations={"microserve.io/models": "fake"})


RBAC = Path(__file__).parent.parent / "deploy" / "kubernetes" / "rbac.yaml"


def test_the_rbac_manifest_grants_exactly_what_the_router_uses() -> None:
    assert role_rules(RBAC) == {
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("apps", "deployments/scale", "get"),
        ("apps", "deployments/scale", "patch"),
    }


async def test_a_router_follows_pods_and_scales_its_deployment(tmp_path: Path) -> None:
    """`microserve router --discovery k8s://… --k8s-scale k8s://…` in front of fake engines whose pods
    share 127.0.0.1 on distinct ports (the `microserve.io/port` annotation), on an API server that
    enforces deploy/kubernetes/rbac.yaml (anything else would be answered 403)."""
    api = FakeKubeAPI(rbac=RBAC)
    await api.start()
    try:
        await router_on_k8s(api, tmp_path)
    finally:
        await api.stop()


async def router_on_k8s(api: FakeKubeAPI, tmp_path: Path) -> None:
    config_path = api.kubeconfig(tmp_path / "kubeconfig")
    api.deployment("engine", 2)
    async with fakes(3) as servers:
        a, b, c = (s.url for s in servers)
        await api.put(engine_pod("engine-a", a))
        await api.put(engine_pod("engine-b", b))
        await api.put(engine_pod("engine-c", c, ready=False))
        args = build_parser().parse_args([
            "router",
            "--discovery", f"k8s://serving?selector=app%3Dengine&kubeconfig={config_path}",
            "--k8s-scale", f"k8s://serving/engine?min=1&max=3&down-after=1&kubeconfig={config_path}",
            "--admin-token", "t",
        ])  # fmt: skip
        config = config_from_args(args)
        config.health = HealthConfig(interval_s=0.2)
        router = Router(config)
        async with serving(router) as client:
            assert [w.url for w in router.pool] == [a, b]  # listed before the router serves
            assert router.k8s_scaler is not None
            router.k8s_scaler.interval_s = 0.1
            for _ in range(4):
                r = await client.post(
                    "/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2}
                )
                assert r.status == 200
            assert [len(s.generate_calls) for s in servers] == [2, 2, 0]

            await api.put(engine_pod("engine-c", c))  # c passes its readiness probe
            await api.delete("engine-a")  # a is deleted
            await wait_for(lambda: [w.url for w in router.pool] == [b, c], "a out and c in")
            await wait_for(lambda: all(w.healthy for w in router.pool), "c checked")
            for _ in range(2):
                r = await client.post(
                    "/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2}
                )
                assert r.status == 200
            assert [len(s.generate_calls) for s in servers] == [2, 3, 1]
            ready = await (await client.get("/ready")).json()
            assert ready["discovery"][0]["connected"] and ready["discovery"][0]["workers"] == 2
            r = await client.get("/admin/workers", headers={"Authorization": "Bearer t"})
            sources = {w["url"]: w["source"] for w in (await r.json())["workers"]}
            assert sources[c].startswith("k8s://serving?")

            # Idle: after a second of low load the Deployment goes from 2 to 1 replicas, never below.
            await wait_for(lambda: api.patches == [("engine", 1)], "a step down")
            assert router.k8s_scaler.replicas == {Role.BOTH: 1} and router.k8s_scaler.error is None


async def test_a_role_without_watch_is_reported(tmp_path: Path) -> None:
    manifest = tmp_path / "rbac.yaml"
    manifest.write_text(RBAC.read_text().replace('["list", "watch"]', '["list"]'))
    api = FakeKubeAPI(rbac=manifest)
    await api.start()
    await api.put(make_pod("a", "10.0.0.1"))
    f = follow(api)
    try:
        assert await f.next() == ["http://10.0.0.1:8100"]  # listed, then the watch is refused
        await wait_for(lambda: "403" in (f.source.status.error or ""), "the refused watch reported")
        assert 'cannot watch resource "pods"' in (f.source.status.error or "")
    finally:
        await f.stop()
        await api.stop()


async def test_a_request_scales_an_empty_deployment_from_zero(tmp_path: Path) -> None:
    """A Deployment at 0 replicas: a request is held in the router, the actuator patches 1, the pod the
    Deployment then starts (played here) turns Ready, joins, and the held request is answered."""
    api = FakeKubeAPI(rbac=RBAC)
    await api.start()
    config_path = api.kubeconfig(tmp_path / "kubeconfig")
    api.deployment("engine", 0)
    try:
        async with fakes(1) as (server,):
            config = RouterConfig(
                discovery=[f"k8s://serving?selector=app%3Dengine&kubeconfig={config_path}"],
                k8s_scale=[f"k8s://serving/engine?min=0&max=2&kubeconfig={config_path}"],
                health=HealthConfig(interval_s=0.2),
            )
            router = Router(config)
            async with serving(router) as client:
                assert len(router.pool) == 0
                body = {"model": "fake", "prompt": "x", "max_tokens": 2}
                held = asyncio.create_task(client.post("/v1/completions", json=body))
                await wait_for(lambda: api.patches == [("engine", 1)], "a scale from zero")
                assert not held.done()
                await api.put(engine_pod("engine-x", server.url))  # the Deployment's new pod is Ready
                r = await asyncio.wait_for(held, WAIT_S)
                assert r.status == 200 and len(server.generate_calls) == 1
    finally:
        await api.stop()
