"""deploy/helm/microserve rendered by Helm's own engine (helm-python-sdk: Helm's Go SDK through its C ABI)
for several values, every object checked against the Kubernetes API's schemas (kubernetes-validate,
strict: no unknown fields), the CRDs (ServiceMonitor, ScaledObject) field by field; the router's and
engines' arguments parsed by microserve's own parsers; and the Role proven exact by running the router's
discovery and autoscaler, built from the rendered arguments, against the fake API server."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from microserve.cli import build_parser
from microserve.router.discovery import make_discovery
from microserve.router.kube_scaler import DeploymentScaler
from microserve.router.workers import WorkerPool
from tests.kube_fake import FakeKubeAPI, make_pod, role_rules

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "microserve"
NAMESPACE = "serving"
# The oldest release the chart's kubeVersion allows, and the newest kubernetes-validate knows.
KUBE_VERSIONS = ["1.26.0", "1.37.0"]

PD = {"router": {"strategy": "pd"}, "engines": {"both": {"enabled": False}, "prefill": {"enabled": True},
      "decode": {"enabled": True, "replicas": 3}}}  # fmt: skip
VALUES: dict[str, dict[str, Any]] = {
    "default": {},
    "pd": PD,
    "keda": {**PD, "autoscaling": {"mode": "keda"}, "serviceMonitor": {"enabled": True}},
    "router-scales": {"autoscaling": {"mode": "router"}, "engines": {"both": {"minReplicas": 0}}},
    "external-redis": {
        "redis": {"url": "redis://redis.shared:6379/2"},
        "auth": {"existingSecret": "ms-auth"},
        "router": {"replicas": 4, "policy": "prefix_aware"},
    },
    "etcd-sim": {
        "discovery": "etcd",
        "etcd": {"enabled": True},
        "redis": {"enabled": False},
        "engineDefaults": {"backend": "sim", "extraArgs": ["--max-num-seqs", "64"]},
    },
}


Rendered = tuple[str, list[dict[str, Any]]]  # a values set's name, and its objects


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="ms", namespace=NAMESPACE, is_install=True)
    return [doc for name, text in sorted(manifests.items()) if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]  # fmt: skip


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def router_args(objects: list[dict[str, Any]]) -> list[str]:
    return list(container(find(objects, "Deployment", "ms-microserve-router")[0])["args"])


def parse_microserve(args: list[str]) -> Any:
    """argparse errors exit: turned into a test failure naming the arguments."""
    try:
        return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"microserve refuses: {shlex.join(args)}")


def engines(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["labels"]["microserve.io/role"]: d for d in find(objects, "Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "engine"}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(VALUES))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return request.param, render(VALUES[request.param])


def test_helm_lint_strict_passes_for_every_values_set() -> None:
    for name, values in VALUES.items():
        report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v1.26.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
        assert not problems, (name, problems)


def test_every_object_is_valid_against_the_kubernetes_schemas(rendered: Rendered) -> None:
    _, objects = rendered
    crds = {"monitoring.coreos.com/v1", "keda.sh/v1alpha1"}
    for obj in objects:
        if obj["apiVersion"] in crds:
            continue  # below, field by field
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                what = f"{obj['kind']} {obj['metadata']['name']} on {version}"
                pytest.fail(f"{what}: {exc.message} at {exc.path}")
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "two objects of one kind share a name"


def test_the_crds_carry_the_fields_their_operators_read() -> None:
    objects = render(VALUES["keda"])
    (monitor,) = find(objects, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [s for s in find(objects, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert sorted(s["metadata"]["name"] for s in services) == [
        "ms-microserve-engines",
        "ms-microserve-router",
    ]
    for service in services:  # the endpoint's port is a named port of each scraped Service
        assert [p["name"] for p in service["spec"]["ports"]] == [monitor["spec"]["endpoints"][0]["port"]]
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]

    scaled = {o["metadata"]["name"]: o for o in find(objects, "ScaledObject")}
    deployments = engines(objects)
    assert sorted(scaled) == sorted(d["metadata"]["name"] for d in deployments.values())
    for role, deployment in deployments.items():
        spec = scaled[deployment["metadata"]["name"]]["spec"]
        assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                             "cooldownPeriod", "idleReplicaCount", "advanced", "triggers",
                             "fallback"}  # fmt: skip
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": deployment["metadata"]["name"]}  # fmt: skip
        assert "replicas" not in deployment["spec"]  # KEDA's to set: an upgrade must not reset it
        assert isinstance(spec["minReplicaCount"], int) and spec["maxReplicaCount"] >= spec["minReplicaCount"]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior == {"scaleDown": {"stabilizationWindowSeconds": 0}}
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert set(trigger["metadata"]) == {"serverAddress", "query", "threshold"}
        # KEDA's trigger metadata is a map of strings
        assert all(isinstance(v, str) for v in trigger["metadata"].values())
        assert trigger["metadata"]["query"] == (
            f'max(microserve_router_desired_replicas{{role="{role}",namespace="{NAMESPACE}"}})'
        )


def test_router_and_engine_arguments_are_what_microserve_accepts(rendered: Rendered) -> None:
    name, objects = rendered
    router = parse_microserve(router_args(objects))
    assert router.command == "router" and router.host == "0.0.0.0"
    for role, deployment in engines(objects).items():
        engine = parse_microserve([a.replace("$(POD_IP)", "10.1.2.3") for a in container(deployment)["args"]])
        assert engine.command == "engine" and engine.role == role
        spec = deployment["spec"]["template"]["spec"]
        c = container(deployment)
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        assert c["ports"][0]["containerPort"] == engine.port
        assert spec["terminationGracePeriodSeconds"] > engine.drain_timeout  # SIGTERM drains, then SIGKILL
        if name == "etcd-sim":
            assert engine.backend == "sim" and engine.register == "etcd://ms-microserve-etcd:2379"
            assert any(e["name"] == "POD_IP" for e in c["env"]) and engine.max_num_seqs == 64


def test_the_router_finds_the_engine_pods_and_nothing_else(rendered: Rendered, kubeconfig: Path) -> None:
    name, objects = rendered
    FakeKubeAPI().kubeconfig(kubeconfig, NAMESPACE)  # only read, never reached
    (discovery,) = [a.split("=", 1)[1] for a in router_args(objects) if a.startswith("--discovery=")]
    if name == "etcd-sim":
        assert discovery == "etcd://ms-microserve-etcd:2379"
        return
    source = make_discovery(discovery)
    terms = dict(t.split("=", 1) for t in source.selector.split(","))  # type: ignore[attr-defined]
    for deployment in find(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        is_engine = deployment in engines(objects).values()
        assert (terms.items() <= labels.items()) == is_engine, deployment["metadata"]["name"]


def test_shared_state_and_the_secrets(rendered: Rendered) -> None:
    name, objects = rendered
    shared = [a.split("=", 1)[1] for a in router_args(objects) if a.startswith("--shared-state=")]
    expected = {"external-redis": ["redis://redis.shared:6379/2"], "etcd-sim": []}
    assert shared == expected.get(name, ["redis://ms-microserve-redis:6379"])
    assert bool(find(objects, "Deployment", "ms-microserve-redis")) == (
        shared == ["redis://ms-microserve-redis:6379"]
    )
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(find(objects, "Deployment",
           "ms-microserve-router")[0])["env"] if "valueFrom" in e}  # fmt: skip
    secret = "ms-auth" if name == "external-redis" else "ms-microserve-auth"
    assert env == {"MICROSERVE_ADMIN_TOKEN": {"name": secret, "key": "admin-token"},
                   "MICROSERVE_INTERNAL_TOKEN": {"name": secret, "key": "internal-token"}}  # fmt: skip
    assert bool(find(objects, "Secret")) == (name != "external-redis")


def test_values_that_cannot_work_are_refused_with_one_line() -> None:
    for values, message in [  # the templates' checks
        ({"engines": {"both": {"enabled": False}}}, "enable at least one role"),
        ({"engines": {"both": {"enabled": False}, "prefill": {"enabled": True}}}, "prefill needs decode"),
        ({"discovery": "etcd"}, "set etcd.enabled or etcd.url"),
    ]:
        with pytest.raises(helm.HelmRenderError, match=message):
            render(values)
    for values, message in [  # values.schema.json
        (
            {"engines": {"both": {"replica": 2}}},
            "at '/engines/both': additional properties 'replica' not allowed",
        ),
        ({"discovery": "dns"}, "at '/discovery': value must be one of 'kubernetes', 'etcd'"),
        (
            {"autoscaling": {"mode": "hpa"}},
            "at '/autoscaling/mode': value must be one of 'none', 'router', 'keda'",
        ),
        ({"redis": {"url": "localhost:6379"}}, "at '/redis/url': 'localhost:6379' does not match"),
        ({"engineDefaults": {"backend": "vllm"}}, "at '/engineDefaults/backend'"),
    ]:
        with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
            render(values)


# -- the Role is exactly what the router's code calls ---------------------------------------------------


@pytest.fixture
def kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    path = tmp_path / "kubeconfig"
    monkeypatch.setenv("KUBECONFIG", str(path))
    yield path


def engine_pod(deployment: dict[str, Any], index: int, ip: str = "") -> dict[str, Any]:
    """A Ready pod as the Deployment's template makes it."""
    meta = deployment["spec"]["template"]["metadata"]
    return make_pod(f"{deployment['metadata']['name']}-{index}", ip or f"10.0.0.{index}",
                    labels=meta["labels"], annotations=meta["annotations"], namespace=NAMESPACE)  # fmt: skip


@pytest.mark.parametrize("values", ["default", "router-scales", "keda"])
async def test_the_role_grants_exactly_what_discovery_and_scaling_call(
    values: str, kubeconfig: Path, tmp_path: Path
) -> None:
    objects = render(VALUES[values])
    role_file = tmp_path / "role.yaml"
    role_file.write_text(yaml.safe_dump_all(find(objects, "Role")))
    api = FakeKubeAPI(rbac=role_file)  # answers 403 outside the Role
    await api.start()
    api.kubeconfig(kubeconfig, NAMESPACE)
    args = router_args(objects)
    deployments = engines(objects)
    for i, deployment in enumerate(deployments.values(), start=1):
        await api.put(engine_pod(deployment, i))
        api.deployment(deployment["metadata"]["name"], 1, NAMESPACE)
    (url,) = [a.split("=", 1)[1] for a in args if a.startswith("--discovery=")]
    source = make_discovery(url)
    pool = WorkerPool()
    try:
        membership = aiter(source.watch())
        specs = await anext(membership)  # a list
        assert sorted((s.role, s.url) for s in specs) == sorted(
            (role, f"http://10.0.0.{i}:8100") for i, role in enumerate(deployments, start=1)
        )
        await api.put(engine_pod(next(iter(deployments.values())), 9))
        assert len(await anext(membership)) == len(specs) + 1  # then a watch
        for spec in specs:
            pool.add(spec).in_flight = 30  # load: the autoscaler wants more
        scale = [a.split("=", 1)[1] for a in args if a.startswith("--k8s-scale=")]
        if scale:
            scaler = DeploymentScaler.from_urls(scale, lambda: pool, lambda: 0)
            try:
                await scaler.tick()
                assert scaler.error is None
            finally:
                await scaler.close()
            patched = {name for name, _ in api.patches}
            names = {d["metadata"]["name"] for d in deployments.values()}
            assert patched == (set() if values == "keda" else names)
            for rule in find(objects, "Role")[0]["rules"]:  # the scale rule names exactly the Deployments
                if rule["resources"] == ["deployments/scale"]:
                    assert set(rule["resourceNames"]) == names
        assert api.used == role_rules(role_file)
    finally:
        await source.close()
        await api.stop()


def test_deploy_kubernetes_rbac_yaml_is_the_charts_role() -> None:
    """deploy/kubernetes/rbac.yaml (for routers run without the chart) grants what the chart's Role grants
    when the router discovers and scales (docs/kubernetes.md)."""
    objects = render(VALUES["router-scales"])
    (role,) = find(objects, "Role")
    manifest = CHART.parent.parent / "kubernetes" / "rbac.yaml"
    (plain,) = [d for d in yaml.safe_load_all(manifest.read_text()) if d["kind"] == "Role"]
    strip = [{k: v for k, v in r.items() if k != "resourceNames"} for r in role["rules"]]
    assert plain["rules"] == strip
