"""One sim engine process for the tenant tests, and an in-process router in front of it with keys on."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai

from microserve.processes import ManagedProcess, free_port
from microserve.router.config import RouterConfig
from microserve.router.router import Router
from microserve.router.workers import WorkerKind, WorkerSpec
from tests.fleet import write_profile
from tests.router_fakes import RouterClient, serving

MODEL = "smollm2-135m"
ADMIN_TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def engine_cmd(profile: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
            "--sim-profile", str(profile), "--port", str(port), "--threads", "1"]  # fmt: skip


def start_engine(directory: Path, step_s: float = 0.002) -> Iterator[ManagedProcess]:
    port = free_port()
    engine = ManagedProcess(engine_cmd(write_profile(directory / "profile.json", step_s), port),
                            f"http://127.0.0.1:{port}")  # fmt: skip
    try:
        engine.wait_ready(timeout=180)
        yield engine
    finally:
        engine.stop()


@asynccontextmanager
async def gateway(engine: ManagedProcess, **settings: Any) -> AsyncIterator[RouterClient]:
    workers = [WorkerSpec(engine.url, kind=WorkerKind.MICROSERVE)]
    router = Router(RouterConfig(workers=workers, admin_token=ADMIN_TOKEN, **settings))
    async with serving(router) as client:
        yield client


async def new_key(client: RouterClient, **spec: Any) -> str:
    async with client.post("/admin/keys", json={"tenant": "t", **spec}, headers=ADMIN) as resp:
        assert resp.status == 201, await resp.text()
        return (await resp.json())["key"]


def sdk(client: RouterClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{client.server.url}/v1", api_key=key, max_retries=0)


def start_redis() -> Iterator[str]:
    """A real redis-server (Debian's) on a free loopback port, nothing saved to disk; yields its URL."""
    import shutil
    import socket
    import subprocess
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is missing: scripts/setup.sh --test installs it")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
