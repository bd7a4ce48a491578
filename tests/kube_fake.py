"""A fake Kubernetes API server on aiohttp speaking the real protocol for what microserve uses: pods listed
by label selector with a resourceVersion, watched as newline-delimited JSON events (ADDED, MODIFIED,
DELETED, BOOKMARK, ERROR) from a version, 410 Gone for a version older than it keeps (an HTTP 410 or an
ERROR event, as real servers do both), watches that end at `timeoutSeconds`, bearer-token auth, and the
Deployment scale subresource (GET, merge PATCH). It can be restarted on its port and can drop its
watches or forget its history, to exercise the client's recovery."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from microserve.processes import free_port


def make_pod(name: str, ip: str, *, port: int | None = None, ready: bool = True,
             labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
             namespace: str = "serving") -> dict[str, Any]:  # fmt: skip
    ann = dict(annotations or {})
    if port is not None:
        ann["microserve.io/port"] = str(port)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels or {"app": "engine"}),
            "annotations": ann,
        },
        "spec": {"containers": [{"name": "engine", "ports": [{"name": "http", "containerPort": 8100}]}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def set_ready(pod: dict[str, Any], ready: bool) -> None:
    pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value.lstrip("="):
            return False
    return True


class FakeKubeAPI:
    def __init__(self, token: str = "secret-token", rbac: Path | None = None) -> None:
        self.token = token
        # (API group, resource, verb) the token may use, from a Role in a manifest; None: anything.
        self.allowed = role_rules(rbac) if rbac is not None else None
        self.port = free_port()
        self.version = 100
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []  # (version, type, pod) kept for watches
        self.oldest = self.version  # a watch from before this is Gone
        self.gone_as_event = True  # 410 as an ERROR event on a 200 stream (else as an HTTP 410)
        self.deployments: dict[tuple[str, str], int] = {}
        self.patches: list[tuple[str, int]] = []  # (deployment, replicas) in order
        self.lists = 0
        self.watches = 0
        self.requests: list[str] = []
        self.used: set[tuple[str, str, str]] = set()  # (API group, resource, verb) of authorized calls
        self._changed = asyncio.Condition()
        self._streams: set[web.StreamResponse] = set()
        self._runner: web.AppRunner | None = None

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Path, namespace: str = "serving") -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.server}}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": namespace}}],
        }))  # fmt: skip
        return path

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        app.router.add_get("/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale", self._get_scale)
        app.router.add_patch("/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale", self._patch_scale)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self, forget: bool = True) -> None:
        """Down and up again on the same port; `forget`: its watch cache is gone (as after a real
        restart, old versions are answered with 410)."""
        await self.stop()
        if forget:
            self.compact()
        await self.start()

    def compact(self) -> None:
        self.history.clear()
        self.version += 1
        self.oldest = self.version

    async def drop_watches(self) -> None:
        for stream in list(self._streams):
            transport = stream._req.transport if stream._req is not None else None
            if transport is not None:
                transport.close()
        self._streams.clear()

    # -- changes, each a new version and a watch event --

    async def _emit(self, kind: str, pod: dict[str, Any]) -> None:
        self.version += 1
        pod = json.loads(json.dumps(pod))
        pod["metadata"]["resourceVersion"] = str(self.version)
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        if kind == "DELETED":
            self.pods.pop(key, None)
        else:
            self.pods[key] = pod
        self.history.append((self.version, kind, pod))
        async with self._changed:
            self._changed.notify_all()

    async def put(self, pod: dict[str, Any]) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        await self._emit("MODIFIED" if key in self.pods else "ADDED", pod)

    async def delete(self, name: str, namespace: str = "serving") -> None:
        await self._emit("DELETED", self.pods[(namespace, name)])

    def deployment(self, name: str, replicas: int, namespace: str = "serving") -> None:
        self.deployments[(namespace, name)] = replicas

    # -- handlers --

    def _authorized(self, request: web.Request) -> None:
        self.requests.append(f"{request.method} {request.path_qs}")
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized(text=json.dumps(_status(401, "Unauthorized")),
                                       content_type="application/json")  # fmt: skip
        group, resource = (
            ("apps", "deployments/scale") if request.path.startswith("/apis/apps/") else ("", "pods")
        )
        if request.method == "PATCH":
            verb = "patch"
        elif resource == "pods":
            verb = "watch" if request.query.get("watch") in ("1", "true") else "list"
        else:
            verb = "get"
        if self.allowed is not None and (group, resource, verb) not in self.allowed:
            message = f'cannot {verb} resource "{resource}" in API group "{group}"'
            raise web.HTTPForbidden(text=json.dumps(_status(403, message, reason="Forbidden")),
                                    content_type="application/json")  # fmt: skip
        self.used.add((group, resource, verb))

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        self._authorized(request)
        ns, selector = request.match_info["ns"], request.query.get("labelSelector", "")
        if request.query.get("watch") in ("1", "true"):
            return await self._watch(request, ns, selector)
        self.lists += 1
        items = [p for (n, _), p in sorted(self.pods.items()) if n == ns and
                 _matches(p["metadata"]["labels"], selector)]  # fmt: skip
        meta = {"resourceVersion": str(self.version)}
        return web.json_response({"apiVersion": "v1", "kind": "PodList", "metadata": meta, "items": items})

    async def _watch(self, request: web.Request, ns: str, selector: str) -> web.StreamResponse:
        self.watches += 1
        since = int(request.query.get("resourceVersion") or self.version)
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        gone = since < self.oldest
        if gone and not self.gone_as_event:
            raise web.HTTPGone(text=json.dumps(_status(410, "too old resource version")),
                               content_type="application/json")  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        self._streams.add(resp)
        try:
            if gone:
                error = _status(410, f"too old resource version: {since} ({self.oldest})", reason="Expired")
                await resp.write(json.dumps({"type": "ERROR", "object": error}).encode() + b"\n")
                return resp
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                for version, kind, pod in self.history:
                    if (
                        version > since
                        and pod["metadata"]["namespace"] == ns
                        and _matches(pod["metadata"]["labels"], selector)
                    ):
                        await resp.write(json.dumps({"type": kind, "object": pod}).encode() + b"\n")
                since = self.version
                left = deadline - loop.time()
                if left <= 0:
                    return resp
                async with self._changed:
                    try:
                        await asyncio.wait_for(self._changed.wait(), left)
                    except TimeoutError:
                        return resp
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        finally:
            self._streams.discard(resp)

    async def _get_scale(self, request: web.Request) -> web.Response:
        self._authorized(request)
        key = (request.match_info["ns"], request.match_info["name"])
        if key not in self.deployments:
            raise web.HTTPNotFound(text=json.dumps(_status(404, f'deployments.apps "{key[1]}" not found')),
                                   content_type="application/json")  # fmt: skip
        return web.json_response(_scale(key, self.deployments[key]))

    async def _patch_scale(self, request: web.Request) -> web.Response:
        self._authorized(request)
        key = (request.match_info["ns"], request.match_info["name"])
        if key not in self.deployments:
            raise web.HTTPNotFound(text=json.dumps(_status(404, f'deployments.apps "{key[1]}" not found')),
                                   content_type="application/json")  # fmt: skip
        if request.content_type != "application/merge-patch+json":
            raise web.HTTPUnsupportedMediaType(text=json.dumps(_status(415, "unsupported patch type")),
                                               content_type="application/json")  # fmt: skip
        body = await request.json()
        replicas = body["spec"]["replicas"]
        if not isinstance(replicas, int) or replicas < 0:
            raise web.HTTPUnprocessableEntity(text=json.dumps(_status(422, "spec.replicas: Invalid value")),
                                              content_type="application/json")  # fmt: skip
        self.deployments[key] = replicas
        self.patches.append((key[1], replicas))
        return web.json_response(_scale(key, replicas))


def role_rules(manifest: Path) -> set[tuple[str, str, str]]:
    """What the Roles in a manifest grant, as (API group, resource, verb)."""
    import yaml

    granted = set()
    for doc in yaml.safe_load_all(manifest.read_text()):
        if doc and doc.get("kind") in ("Role", "ClusterRole"):
            for rule in doc.get("rules") or []:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        granted.update((group, resource, verb) for verb in rule["verbs"])
    return granted


def _status(code: int, message: str, reason: str = "") -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


def _scale(key: tuple[str, str], replicas: int) -> dict[str, Any]:
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {"name": key[1], "namespace": key[0]},
            "spec": {"replicas": replicas}, "status": {"replicas": replicas}}  # fmt: skip
