"""Where the router's workers come from besides flags, YAML and the admin API: a watched file and etcd
(Kubernetes joins here as one more `Discovery`), followed by `DiscoveryFleet` into the worker pool."""

from __future__ import annotations

from urllib.parse import urlsplit

from microserve.router.discovery.base import Discovery, DiscoveryStatus
from microserve.router.discovery.sync import DiscoveryCollector, DiscoveryFleet

__all__ = ["Discovery", "DiscoveryCollector", "DiscoveryFleet", "DiscoveryStatus", "make_discovery"]

SCHEMES = ("etcd", "file", "k8s")


def make_discovery(url: str) -> Discovery:
    """A source from its URL: `etcd://HOST:PORT[,HOST:PORT…][/prefix]`, `file:///path/workers.yaml`, or
    `k8s://NAMESPACE?selector=…&port=…`."""
    scheme = urlsplit(url).scheme
    if scheme == "etcd":
        from microserve.router.discovery.etcd import EtcdDiscovery

        return EtcdDiscovery.from_url(url)
    if scheme == "k8s":
        from microserve.router.discovery.k8s import KubernetesDiscovery

        return KubernetesDiscovery.from_url(url)
    if scheme == "file":
        from microserve.router.discovery.file import FileDiscovery

        return FileDiscovery.from_url(url)
    raise ValueError(f"--discovery takes {' or '.join(s + '://…' for s in SCHEMES)}, got {url!r}")
