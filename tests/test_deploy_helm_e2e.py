"""The chart's rendered commands run for real (no cluster: tests/kube_fake.py plays the API server, with the
rendered Role enforced): a sim engine started with the engine Deployment's arguments and the Secret's
token, its pod as the Deployment's template makes it, and a router with the router Deployment's arguments
(a real redis-server for --shared-state) serve a request, and the admin API opens to the
Secret's admin token."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from microserve.processes import ManagedProcess, free_port
from tests.kube_fake import FakeKubeAPI
from tests.tenant_fleet import start_redis
from tests.test_deploy_helm import (
    NAMESPACE,
    container,
    engine_pod,
    engines,
    find,
    render,
    router_args,
)
from tests.test_router_discovery_e2e import write_profile

pytestmark = pytest.mark.slow


def on_loopback(args: list[str], port: int) -> list[str]:
    """The pod's arguments on 127.0.0.1 and a free port (pods each have their own address; here they share
    one)."""
    out = []
    for arg in args:
        if arg == "--host=0.0.0.0":
            arg = "--host=127.0.0.1"
        elif arg.startswith("--port="):
            arg = f"--port={port}"
        out.append(arg)
    return out


def secret_env(c: dict[str, Any], tokens: dict[str, str]) -> dict[str, str]:
    return {e["name"]: tokens[e["valueFrom"]["secretKeyRef"]["key"]] for e in c["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}  # fmt: skip


async def test_the_rendered_router_and_engine_serve_through_the_fake_cluster(tmp_path: Path) -> None:
    profile = write_profile(tmp_path / "profile.json")
    objects = render({
        "engineDefaults": {"backend": "sim", "extraArgs": ["--sim-profile", str(profile), "--threads", "1"]},
        "autoscaling": {"mode": "router"},
    })  # fmt: skip
    tokens = {k: base64.b64decode(v).decode() for k, v in find(objects, "Secret")[0]["data"].items()}
    deployment = engines(objects)["both"]
    role_file = tmp_path / "role.yaml"
    role_file.write_text(yaml.safe_dump_all(find(objects, "Role")))
    api = FakeKubeAPI(rbac=role_file)
    await api.start()
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig", NAMESPACE)
    processes: list[ManagedProcess] = []
    with contextlib.ExitStack() as stack:
        try:
            engine_port = free_port()
            c = container(deployment)
            cmd = [sys.executable, "-m", "microserve", *on_loopback(c["args"], engine_port)]
            engine = ManagedProcess(cmd, f"http://127.0.0.1:{engine_port}", env=secret_env(c, tokens))
            processes.append(engine)
            await asyncio.to_thread(engine.wait_ready, 120)
            pod = engine_pod(deployment, 1, ip="127.0.0.1")
            pod["metadata"]["annotations"]["microserve.io/port"] = str(engine_port)
            await api.put(pod)
            api.deployment(deployment["metadata"]["name"], 1, NAMESPACE)

            redis = stack.enter_context(contextlib.contextmanager(start_redis)())
            shared = f"--shared-state={redis}"
            args = [shared if a.startswith("--shared-state=") else a for a in router_args(objects)]
            router_port = free_port()
            router_c = container(find(objects, "Deployment", "ms-microserve-router")[0])
            env = {
                **secret_env(router_c, tokens),
                "KUBECONFIG": str(kubeconfig),
                "KUBERNETES_SERVICE_HOST": "",
            }
            router = ManagedProcess([sys.executable, "-m", "microserve", *on_loopback(args, router_port)],
                                    f"http://127.0.0.1:{router_port}", env=env)  # fmt: skip
            processes.append(router)
            await asyncio.to_thread(router.wait_ready, 60)

            async with aiohttp.ClientSession(base_url=router.url) as http:
                body = {"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
                async with http.post("/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    assert (await r.json())["usage"]["completion_tokens"] == 4
                async with http.get("/admin/workers") as r:
                    assert r.status == 401
                admin = {"Authorization": f"Bearer {tokens['admin-token']}"}
                async with http.get("/admin/workers", headers=admin) as r:
                    assert r.status == 200 and engine.url in await r.text()
                async with http.get("/metrics") as r:  # the autoscaler's decision, for a cluster to see
                    assert 'microserve_router_desired_replicas{role="both"}' in await r.text()
            assert ("", "pods", "watch") in api.used and ("apps", "deployments/scale", "get") in api.used
        finally:
            for p in reversed(processes):
                await asyncio.to_thread(p.stop, 10)
            await api.stop()
