"""A small real fleet to observe: two sim engines behind a `microserve router` process with the admin API,
a failing OpenAI-compatible worker that can join it, and traffic of every kind (PD and data_parallel,
streamed and whole, chat and completions, some failing), for the Prometheus and browser tests. On request,
a second router in front of the first engine is a tenant gateway (API keys, a response cache) with
traffic that makes its metrics move: a valid key, a wrong key, a cache hit, a rate-limited request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from microserve.processes import ManagedProcess, free_port
from tests.fleet import write_profile
from tests.router_fakes import FakeOpenAI

MODEL = "smollm2-135m"
ADMIN_TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DEADLINE_S = 60.0
# The pd strategy moves KV engine to engine: only between engines that share the internal token.
INTERNAL_ENV = {"MICROSERVE_INTERNAL_TOKEN": "internal-secret"}


def wait_until(condition: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    """Poll `condition` until it returns something truthy (returned), or fail after the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class FailingWorker:
    """An OpenAI-compatible server (tests/router_fakes.py) that passes health checks but answers every
    generation with HTTP 500, on its own event loop thread so that sync tests can use it."""

    def __init__(self) -> None:
        self.fake = FakeOpenAI(model=MODEL)
        self.fake.statuses = [500] * 10_000
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> FailingWorker:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self._loop).result(DEADLINE_S)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self._loop).result(DEADLINE_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(DEADLINE_S)
        self._loop.close()

    @property
    def url(self) -> str:
        return self.fake.url


@dataclass
class Fleet:
    router: ManagedProcess
    engines: list[ManagedProcess]
    failing: FailingWorker
    gateway: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return self.router.url

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = httpx.request(method, self.url + path, json=body, headers=ADMIN, timeout=DEADLINE_S)
        assert resp.status_code < 300, resp.text
        return resp.json()

    def state(self) -> dict[str, Any]:
        return httpx.get(self.url + "/dashboard/state", timeout=DEADLINE_S).json()


@contextlib.contextmanager
def observed_fleet(tmp: Path, step_s: float = 0.005, gateway: bool = False) -> Iterator[Fleet]:
    """Two sim engines (role both) and a router (strategy pd, one attempt per request so that failures
    reach clients) on loopback; the failing worker runs but has not joined the router. With `gateway`,
    a second router (`--api-keys memory --response-cache memory`) in front of the first engine."""
    profile = write_profile(tmp / "profile.json", step_s)
    engines: list[ManagedProcess] = []
    router: ManagedProcess | None = None
    with FailingWorker() as failing, contextlib.ExitStack() as stack:
        for _ in range(2):
            port = free_port()
            cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
                   "--sim-profile", str(profile), "--port", str(port), "--threads", "1"]  # fmt: skip
            engine = ManagedProcess(cmd, f"http://127.0.0.1:{port}", INTERNAL_ENV)
            stack.callback(engine.stop)
            engines.append(engine)
        for engine in engines:
            engine.wait_ready(timeout=180)
        port = free_port()
        cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "router", "--port", str(port),
               "--strategy", "pd", "--admin-token", ADMIN_TOKEN, "--max-attempts", "1",
               "--health-interval", "0.5"]  # fmt: skip
        for engine in engines:
            cmd += ["--worker", engine.url]
        router = ManagedProcess(cmd, f"http://127.0.0.1:{port}", INTERNAL_ENV)
        stack.callback(router.stop)
        gateway_process = None
        if gateway:
            port = free_port()
            cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "router",
                   "--port", str(port), "--admin-token", ADMIN_TOKEN, "--api-keys", "memory",
                   "--response-cache", "memory", "--worker", engines[0].url]  # fmt: skip
            gateway_process = ManagedProcess(cmd, f"http://127.0.0.1:{port}", INTERNAL_ENV)
            stack.callback(gateway_process.stop)
        router.wait_ready(timeout=120)
        if gateway_process is not None:
            gateway_process.wait_ready(timeout=120)
        yield Fleet(router, engines, failing, gateway_process)


def request(url: str, i: int, *, stream: bool, chat: bool, max_tokens: int = 12) -> int:
    """One request through the router; returns its status (the stream is read to its end)."""
    words = f"Request {i}: tell me about the history of printing, briefly. " * (1 + i % 3)
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    if stream:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with httpx.stream("POST", url + path, json=body, timeout=DEADLINE_S) as resp:
        resp.read()
        return resp.status_code


def traffic(url: str, count: int, start: int = 0, parallel: int = 4) -> list[int]:
    """`count` requests, `parallel` at a time, mixing streamed and whole, chat and completions."""
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        futures = [
            pool.submit(request, url, start + i, stream=i % 2 == 0, chat=i % 3 != 0) for i in range(count)
        ]
        return [f.result() for f in futures]


def failing_phase(fleet: Fleet, count: int = 24) -> list[int]:
    """data_parallel with the failing worker in the pool: some requests answer 500, its circuit opens."""
    fleet.admin("PUT", "/admin/strategy", {"name": "data_parallel"})
    fleet.admin("POST", "/admin/workers", {"url": fleet.failing.url, "kind": "openai", "models": [MODEL]})
    return traffic(fleet.url, count, start=1000, parallel=2)


def tenant_phase(fleet: Fleet) -> list[int]:
    """Through the gateway with a key allowed 3 requests a minute: a miss, the same request again (a cache
    hit), a wrong key (401), another request, and one over the limit (429)."""
    assert fleet.gateway is not None, "observed_fleet(..., gateway=True) starts the gateway"
    url = fleet.gateway.url
    resp = httpx.post(
        url + "/admin/keys", json={"tenant": "acme", "rpm": 3}, headers=ADMIN, timeout=DEADLINE_S
    )
    assert resp.status_code == 201, resp.text
    key = resp.json()["key"]

    def ask(secret: str, prompt: str) -> int:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        headers = {"Authorization": f"Bearer {secret}"}
        return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=DEADLINE_S).status_code

    return [ask(key, "The printing press"), ask(key, "The printing press"), ask("sk-ms-wrong", "Hello"),
            ask(key, "Movable type"), ask(key, "The codex")]  # fmt: skip
