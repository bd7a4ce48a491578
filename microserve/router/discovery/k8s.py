"""`k8s://NAMESPACE?selector=app%3Dmicroserve-engine&port=8100`: the Ready pods that match a label selector,
listed, then followed with a watch from the list's resourceVersion. A watch the server ends (its timeout)
is resumed from the last version seen; 410 Gone (the version is too old, e.g. after an API server
restart) and any failure lead to a fresh list. While the API server is unreachable the last membership
stands, as for etcd.

A pod is a worker while it is Running, has an IP, its Ready condition is True and it is not being deleted.
Its URL is http://POD_IP:PORT, PORT from the `microserve.io/port` annotation, else the URL's `port`, else
the container port named `http`, else 8100. Role, kind, weight and models come from annotations (or
labels) `microserve.io/role|kind|weight|models` (models comma-separated); the pod's labels become the
worker's labels.

Query parameters: selector (a label selector), port, kubeconfig (a path), context (a kubeconfig context),
timeout (seconds a watch lasts before it is resumed)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from microserve.kube.client import Gone, KubeClient, KubeError
from microserve.kube.config import KubeConfig
from microserve.router.discovery.base import Discovery
from microserve.router.workers import WorkerSpec

log = logging.getLogger(__name__)

PREFIX = "microserve.io/"
DEFAULT_PORT = 8100


def _meta(pod: Mapping[str, Any], key: str) -> str | None:
    meta = pod.get("metadata") or {}
    for section in ("annotations", "labels"):
        value = (meta.get(section) or {}).get(PREFIX + key)
        if value is not None:
            return str(value)
    return None


def pod_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    if not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def _port(pod: Mapping[str, Any], default: int | None) -> int:
    value = _meta(pod, "port")
    if value is not None:
        return int(value)
    if default is not None:
        return default
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "http" and port.get("containerPort"):
                return int(port["containerPort"])
    return DEFAULT_PORT


def pod_worker(pod: Mapping[str, Any], port: int | None = None) -> WorkerSpec | None:
    """The worker a pod stands for, None while it is not Ready (a ValueError for bad annotations)."""
    if not pod_ready(pod):
        return None
    ip = pod["status"]["podIP"]
    host = f"[{ip}]" if ":" in ip else ip
    fields: dict[str, Any] = {}
    for key in ("role", "kind"):
        value = _meta(pod, key)
        if value is not None:
            fields[key] = value
    weight = _meta(pod, "weight")
    if weight is not None:
        try:
            fields["weight"] = int(weight)
        except ValueError:
            raise ValueError(f"{PREFIX}weight must be an integer, got {weight!r}") from None
    models = _meta(pod, "models")
    if models:
        fields["models"] = tuple(m.strip() for m in models.split(",") if m.strip())
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return WorkerSpec(f"http://{host}:{_port(pod, port)}", labels=labels, **fields)


def _key(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class KubernetesDiscovery(Discovery):
    def __init__(
        self,
        name: str,
        namespace: str,
        selector: str,
        client: KubeClient,
        *,
        port: int | None = None,
        watch_timeout_s: int = 60,
        retry_s: float = 1.0,
    ) -> None:
        super().__init__(name)
        self.namespace = namespace
        self.selector = selector
        self.client = client
        self.port = port
        self.watch_timeout_s = watch_timeout_s
        self.retry_s = retry_s
        self.pods: dict[str, WorkerSpec] = {}  # namespace/name -> worker, Ready pods only
        self.relists = 0
        self.expired = 0  # 410 Gone answered
        self.cuts = 0  # running watches cut

    @classmethod
    def from_url(cls, url: str) -> KubernetesDiscovery:
        parts = urlsplit(url)
        namespace = unquote(parts.netloc)
        if not namespace or parts.path not in ("", "/"):
            example = "k8s://NAMESPACE?selector=app%3Dengine&port=8100"
            raise ValueError(f"Kubernetes discovery looks like {example}, got {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = sorted(set(query) - {"selector", "port", "kubeconfig", "context", "timeout"})
        if unknown:
            raise ValueError(f"unknown k8s:// parameter(s) {', '.join(unknown)} in {url!r}")
        try:
            port = int(query["port"]) if "port" in query else None
            timeout = int(query.get("timeout", "60"))
        except ValueError:
            raise ValueError(f"port and timeout must be integers in {url!r}") from None
        if (port is not None and not 0 < port < 65536) or timeout < 1:
            raise ValueError(f"need 0 < port < 65536 and timeout >= 1 in {url!r}")
        config = KubeConfig.load(query.get("kubeconfig"), query.get("context"))
        return cls(url, namespace, query.get("selector", ""), KubeClient(config), port=port,
                   watch_timeout_s=timeout)  # fmt: skip

    def _record(self, pod: Mapping[str, Any]) -> None:
        key = _key(pod)
        try:
            spec = pod_worker(pod, self.port)
        except ValueError as exc:
            log.warning("%s: ignoring pod %s: %s", self.name, key, exc)
            spec = None
        if spec is None:
            self.pods.pop(key, None)
        else:
            self.pods[key] = spec

    async def watch(self) -> AsyncIterator[list[WorkerSpec]]:
        loop = asyncio.get_running_loop()
        while True:
            watching_since: float | None = None
            try:
                listing = await self.client.list_pods(self.namespace, self.selector)
                self.relists += 1
                self.pods = {}
                for pod in listing.get("items") or []:
                    self._record(pod)
                version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                self.reached()
                self.status.updates += 1
                yield list(self.pods.values())
                watching_since = loop.time()
                while True:  # watches, each resumed where the last ended, until Gone or a failure
                    async for event in self.client.watch_pods(
                        self.namespace, self.selector, version, self.watch_timeout_s
                    ):
                        pod = event.get("object") or {}
                        version = str((pod.get("metadata") or {}).get("resourceVersion") or version)
                        before = dict(self.pods)
                        if event.get("type") == "DELETED":
                            self.pods.pop(_key(pod), None)
                        elif event.get("type") in ("ADDED", "MODIFIED"):
                            self._record(pod)
                        if self.pods != before:
                            self.status.updates += 1
                            yield list(self.pods.values())
            except Gone as exc:
                self.expired += 1
                log.info("%s: %s; listing again", self.name, exc)
            except KubeError as exc:
                if (
                    exc.status is None
                    and watching_since is not None
                    and loop.time() - watching_since >= self.retry_s
                ):
                    # A watch that had been running was cut (a proxy's idle timeout, an API server
                    # going away): list again at once, and report only if that fails too.
                    self.cuts += 1
                    log.info("%s: %s; listing again", self.name, exc)
                    continue
                if self.status.connected or self.status.error is None:
                    log.warning("%s: %s; keeping the last membership (%d workers)", self.name, exc,
                                len(self.pods))  # fmt: skip
                self.failed(str(exc))
                await asyncio.sleep(self.retry_s)

    async def close(self) -> None:
        await self.client.close()
