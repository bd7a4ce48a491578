"""Where the API server is and how to authenticate: in-cluster (the service account's token and CA under
/var/run/secrets/kubernetes.io/serviceaccount, KUBERNETES_SERVICE_HOST/PORT) or a kubeconfig file's
current context (server, CA, bearer token or client certificate)."""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(slots=True, frozen=True)
class KubeConfig:
    server: str  # e.g. https://10.96.0.1:443 or http://127.0.0.1:8001 (kubectl proxy)
    token: str | None = None
    token_file: Path | None = None  # re-read on each request: projected tokens rotate
    ca_file: str | None = None
    client_cert: tuple[str, str] | None = None  # (cert file, key file)
    insecure: bool = False
    namespace: str | None = None  # the context's (or the service account's) namespace

    def bearer(self) -> str | None:
        if self.token_file is not None:
            return self.token_file.read_text().strip()
        return self.token

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.server.startswith("https://"):
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert is not None:
            ctx.load_cert_chain(*self.client_cert)
        return ctx

    @classmethod
    def in_cluster(cls, root: Path = SERVICE_ACCOUNT) -> KubeConfig:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise ValueError("not in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set")
        if ":" in host:
            host = f"[{host}]"
        ns = root / "namespace"
        return cls(
            f"https://{host}:{port}",
            token_file=root / "token",
            ca_file=str(root / "ca.crt"),
            namespace=ns.read_text().strip() if ns.exists() else None,
        )

    @classmethod
    def from_kubeconfig(cls, path: Path, context: str | None = None) -> KubeConfig:
        import yaml

        try:
            doc: Any = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"kubeconfig {path}: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"kubeconfig {path}: not a kubeconfig")
        name = context or doc.get("current-context")
        ctx = _named(doc, "contexts", name, "context", path)
        cluster = _named(doc, "clusters", ctx.get("cluster"), "cluster", path)
        user = _named(doc, "users", ctx.get("user"), "user", path) if ctx.get("user") else {}
        server = cluster.get("server")
        if not server:
            raise ValueError(f"kubeconfig {path}: cluster {ctx.get('cluster')!r} has no server")
        base = path.parent
        ca = _file(cluster, "certificate-authority", base)
        cert, key = _file(user, "client-certificate", base), _file(user, "client-key", base)
        token_file = user.get("tokenFile")
        return cls(
            str(server).rstrip("/"),
            token=user.get("token"),
            token_file=base / token_file if token_file else None,
            ca_file=ca,
            client_cert=(cert, key) if cert and key else None,
            insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
            namespace=ctx.get("namespace"),
        )

    @classmethod
    def load(cls, kubeconfig: str | None = None, context: str | None = None) -> KubeConfig:
        """A kubeconfig named outright; else in-cluster when in a pod; else $KUBECONFIG or ~/.kube/config."""
        if kubeconfig:
            return cls.from_kubeconfig(Path(kubeconfig).expanduser(), context)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            return cls.in_cluster()
        env = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
        path = Path(env or "~/.kube/config").expanduser()
        if not path.exists():
            raise ValueError(f"no Kubernetes config: not in a cluster and no kubeconfig at {path}")
        return cls.from_kubeconfig(path, context)


def _named(doc: dict[str, Any], section: str, name: Any, key: str, path: Path) -> dict[str, Any]:
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(key)
            return body if isinstance(body, dict) else {}
    raise ValueError(f"kubeconfig {path}: no {key} named {name!r}")


def _file(section: dict[str, Any], key: str, base: Path) -> str | None:
    """`key` as a path (relative to the kubeconfig) or `key-data` (base64) written to a private file."""
    data = section.get(f"{key}-data")
    if data:
        fd, name = tempfile.mkstemp(prefix="microserve-kube-", suffix=".pem")
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(data))
        return name
    value = section.get(key)
    return str(base / value) if value else None
