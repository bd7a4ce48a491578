"""The autoscaler's Kubernetes actuator: one Deployment per role, sized through its scale subresource
(GET, then a merge PATCH of spec.replicas when the autoscaler wants another count).

`--k8s-scale k8s://NAMESPACE/DEPLOYMENT?role=decode&min=1&max=8` (repeatable, one per role). The pods
themselves reach the router through discovery (k8s://NAMESPACE?selector=…): the pool's engines of that
role give the load the autoscaler sees, against the Deployment's spec.replicas. On a step down
Kubernetes picks the pod; it turns terminating, discovery drains it (no new requests) and the engine
finishes what it holds within its termination grace period.

Query parameters: role (both, prefill or decode; default both), min, max, target (requests per replica,
default 8), down-after (seconds of low load before each step down, default 60), up-cooldown (seconds
between steps up, default 5), patch (false: decide and export the decision as
`microserve_router_desired_replicas{role}`, and leave the Deployment to KEDA or an HPA; default true),
kubeconfig, context."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector

from microserve.kube.client import KubeClient, KubeError
from microserve.kube.config import KubeConfig
from microserve.router.autoscaler import Autoscaler, AutoscalerConfig, pool_signals
from microserve.router.workers import Role, Worker

log = logging.getLogger(__name__)

PARAMS = {"role", "min", "max", "target", "down-after", "up-cooldown", "patch", "kubeconfig", "context"}
BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


@dataclass(slots=True, frozen=True)
class ScaleTarget:
    """A Deployment sized by the autoscaler for one role."""

    namespace: str
    deployment: str
    role: Role
    config: AutoscalerConfig
    kubeconfig: str | None = None
    context: str | None = None
    patch: bool = True  # False: the decision is only exported (KEDA or an HPA applies it)

    @classmethod
    def parse(cls, url: str) -> ScaleTarget:
        parts = urlsplit(url)
        name = parts.path.strip("/")
        if parts.scheme != "k8s" or not parts.netloc or not name or "/" in name:
            raise ValueError(
                f"a scaled Deployment looks like k8s://NAMESPACE/DEPLOYMENT?role=…&max=N, got {url!r}"
            )
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = sorted(set(query) - PARAMS)
        if unknown:
            raise ValueError(f"unknown --k8s-scale parameter(s) {', '.join(unknown)} in {url!r}")
        try:
            low = int(query.get("min", "1"))
            high = int(query.get("max", str(max(low, 1))))
            numbers = [float(query.get(k, d)) for k, d in (("target", "8"), ("down-after", "60"),
                                                            ("up-cooldown", "5"))]  # fmt: skip
        except ValueError:
            raise ValueError(f"{url}: min and max must be integers, target, down-after and up-cooldown "
                             "numbers") from None  # fmt: skip
        try:
            config = AutoscalerConfig(
                min_replicas=low,
                max_replicas=high,
                target_load=numbers[0],
                scale_down_after_s=numbers[1],
                scale_up_cooldown_s=numbers[2],
            )
        except ValueError as exc:
            raise ValueError(f"{url}: {exc}") from None
        roles = [str(r) for r in Role]
        if query.get("role", "both") not in roles:
            raise ValueError(f"{url}: role is one of {', '.join(roles)}, got {query['role']!r}")
        role = Role(query.get("role", "both"))
        patch = BOOLEANS.get(query.get("patch", "true").lower())
        if patch is None:
            raise ValueError(f"{url}: patch is true or false, got {query['patch']!r}")
        return cls(unquote(parts.netloc), unquote(name), role, config, query.get("kubeconfig"),
                   query.get("context"), patch)  # fmt: skip


def check_scale_targets(urls: list[str]) -> list[ScaleTarget]:
    """The targets of `--k8s-scale`, at most one per role, with a Kubernetes config to reach them (a
    ValueError otherwise, before anything starts)."""
    targets = [ScaleTarget.parse(u) for u in urls]
    roles = [t.role for t in targets]
    if len(set(roles)) != len(roles):
        raise ValueError("--k8s-scale: one scaled Deployment per role")
    if targets:
        KubeConfig.load(targets[0].kubeconfig, targets[0].context)
    return targets


class DeploymentScaler:
    """Each tick, per target: read the Deployment's replicas, let its role's autoscaler decide from the
    router's pool, and patch the scale when the decision differs. `run` until cancelled, then `close`."""

    def __init__(
        self,
        targets: list[ScaleTarget],
        workers: Callable[[], Iterable[Worker]],
        queued: Callable[[], int],
        client: KubeClient,
        *,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        roles = [t.role for t in targets]
        if len(set(roles)) != len(roles):
            raise ValueError("--k8s-scale: one scaled Deployment per role")
        self.targets = targets
        self.workers = workers
        self.queued = queued
        self.client = client
        self.interval_s = interval_s
        self.clock = clock
        self.scalers = {t.role: Autoscaler(t.config) for t in targets}
        self.replicas: dict[Role, int] = {}  # the Deployment's spec.replicas, as last read or set
        self.desired: dict[Role, int] = {}  # the autoscaler's last decision, patched or only exported
        self.patches = 0
        self.error: str | None = None

    @classmethod
    def from_urls(
        cls,
        urls: list[str],
        workers: Callable[[], Iterable[Worker]],
        queued: Callable[[], int],
        interval_s: float = 1.0,
    ) -> DeploymentScaler:
        """The targets' API server is the first one's kubeconfig (or in-cluster config)."""
        targets = check_scale_targets(urls)
        client = KubeClient(KubeConfig.load(targets[0].kubeconfig, targets[0].context))
        return cls(targets, workers, queued, client, interval_s=interval_s)

    async def tick(self) -> None:
        for target in self.targets:
            try:
                await self._scale(target)
            except KubeError as exc:
                if self.error is None:
                    log.warning("k8s scale %s/%s: %s", target.namespace, target.deployment, exc)
                self.error = str(exc)
            else:
                self.error = None

    async def _scale(self, t: ScaleTarget) -> None:
        current = await self.client.get_scale(t.namespace, t.deployment)
        # The load from the role's engines in the pool; the replicas are the Deployment's own count: those
        # asked for and not Ready yet are starting, and Ready pods beyond it (a rollout's surge, pods
        # being replaced) are not the autoscaler's to count.
        workers = [w for w in self.workers() if w.role == t.role]
        signals = replace(pool_signals(workers, self.queued(), 0), replicas=current)
        scaler = self.scalers[t.role]
        desired = scaler.decide(self.clock(), signals)
        self.desired[t.role] = desired
        if desired != current and t.patch:
            log.info("k8s scale %s/%s: %d -> %d replicas (%s)", t.namespace, t.deployment, current, desired,
                     scaler.reason)  # fmt: skip
            current = await self.client.patch_scale(t.namespace, t.deployment, desired)
            self.patches += 1
        self.replicas[t.role] = current

    async def run(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        await self.client.close()


class ScalerCollector(Collector):
    """`microserve_router_desired_replicas{role}` and `microserve_router_replicas{role}` of the Deployments
    the router sizes: what KEDA or an HPA follows when the router only decides (`patch=false`)."""

    def __init__(self, scaler: DeploymentScaler) -> None:
        self._scaler = scaler

    def collect(self) -> Iterator[GaugeMetricFamily]:
        desired = GaugeMetricFamily(
            "microserve_router_desired_replicas", "Engines the autoscaler wants, by role.", labels=["role"]
        )
        current = GaugeMetricFamily(
            "microserve_router_replicas", "The scaled Deployment's replicas, by role.", labels=["role"]
        )
        for role, replicas in self._scaler.replicas.items():
            desired.add_metric([str(role)], float(self._scaler.desired.get(role, replicas)))
            current.add_metric([str(role)], float(replicas))
        yield desired
        yield current
