"""Membership through a real etcd with real sim engines that register themselves: both get traffic; a router
restarted finds them at once; a newcomer joins and gets traffic; one SIGKILLed under load leaves within its
lease TTL with no request failed; one stopped gracefully withdraws at once and finishes what it holds;
etcd stopped, the router keeps serving its last membership and says so, and follows it again once back."""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from microserve.processes import ManagedProcess, free_port
from microserve.registry.etcd import EtcdClient, EtcdTarget
from microserve.registry.record import Registration
from microserve.router.config import RouterConfig
from microserve.router.health import HealthConfig
from microserve.router.router import Router
from tests.etcd_server import EtcdServer
from tests.router_fakes import RouterClient, serving

pytestmark = pytest.mark.slow

TTL_S = 3  # the engines' lease: a SIGKILLed engine leaves the pool within it
STEP_S = 0.02  # a sim engine step: a 40-token answer lasts about a second, long enough to be cut
DEADLINE_S = 60.0


def write_profile(path: Path) -> Path:
    zero = ("per_token_s", "per_attention_pair_s", "per_kv_gather_token_s", "per_sample_s")
    coefficients = {"step_overhead_s": STEP_S, **dict.fromkeys(zero, 0.0)}
    path.write_bytes(
        orjson.dumps({"format": "microserve-cost-model", "version": 1, "coefficients": coefficients})
    )
    return path


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_profile(tmp_path_factory.mktemp("profile") / "profile.json")


def launch(registry: str, profile: Path, ttl_s: int = TTL_S) -> ManagedProcess:
    """A sim engine that registers in `registry` (not waited for: start several side by side)."""
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
           "--sim-profile", str(profile), "--port", str(port), "--threads", "1",
           "--register", registry, "--register-ttl", str(ttl_s), "--label", f"port={port}"]  # fmt: skip
    return ManagedProcess(cmd, f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def fleet(etcd: EtcdServer, profile: Path) -> Iterator[list[ManagedProcess]]:
    """Two engines registered under /fleet for the whole module, started side by side."""
    started = [launch(etcd.url("/fleet"), profile) for _ in range(2)]
    try:
        for engine in started:
            engine.wait_ready(timeout=180)
        yield started
    finally:
        for engine in started:
            engine.stop()


@asynccontextmanager
async def engine_in(registry: str, profile: Path, ttl_s: int = TTL_S) -> AsyncIterator[ManagedProcess]:
    engine = launch(registry, profile, ttl_s)
    try:
        await asyncio.to_thread(engine.wait_ready, 180)
        yield engine
    finally:
        await asyncio.to_thread(engine.stop)


@asynccontextmanager
async def routing(registry: str, **settings: Any) -> AsyncIterator[RouterClient]:
    health = HealthConfig(interval_s=0.2, timeout_s=1.0)
    router = Router(RouterConfig(discovery=[registry], health=health, admin_token="a", **settings))
    async with serving(router) as client:
        yield client


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def urls(router: Router) -> set[str]:
    return {w.url for w in router.pool}


def ready_urls(router: Router) -> set[str]:
    return {w.url for w in router.pool if w.available}


async def complete(client: RouterClient, i: int, max_tokens: int = 8) -> None:
    body = {"prompt": f"Request number {i}", "max_tokens": max_tokens, "temperature": 0}
    r = await client.post("/v1/completions", json=body)
    text = await r.text()
    assert r.status == 200, text
    assert orjson.loads(text)["usage"]["completion_tokens"] == max_tokens


async def stream(client: RouterClient, i: int, max_tokens: int, started: set[int]) -> None:
    body = {"prompt": f"Stream number {i}", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.post("/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        frames = []
        async for line in r.content:
            if line.startswith(b"data: "):
                frames.append(line[6:].strip())
                started.add(i)
    assert frames[-1] == b"[DONE]", frames[-3:]
    words = [orjson.loads(f)["choices"][0]["text"] for f in frames[:-1] if orjson.loads(f)["choices"]]
    assert len("".join(words).split()) == max_tokens  # every token arrived, across engines if need be


async def test_registered_engines_get_traffic_and_a_restarted_router_finds_them(
    etcd: EtcdServer, fleet: list[ManagedProcess]
) -> None:
    registry = etcd.url("/fleet")
    expected = {e.url for e in fleet}
    async with routing(registry) as client:
        await wait_for(lambda: ready_urls(client.router) == expected, "both engines in the pool")
        await asyncio.gather(*(complete(client, i) for i in range(8)))
        assert {w.url: w.requests for w in client.router.pool} == dict.fromkeys(expected, 4)
        listed = await (await client.get("/admin/workers", headers={"Authorization": "Bearer a"})).json()
        assert {(w["url"], w["source"], w["labels"]["port"]) for w in listed["workers"]} == {
            (e.url, registry, e.url.rsplit(":", 1)[1]) for e in fleet
        }
    # A new router (a restart) reads etcd before it serves: the fleet is there on its first request.
    async with routing(registry) as client:
        assert ready_urls(client.router) == expected
        await asyncio.gather(*(complete(client, i) for i in range(4)))
        assert {w.url: w.requests for w in client.router.pool} == dict.fromkeys(expected, 2)


async def test_a_newcomer_joins_and_killed_under_load_leaves_within_its_ttl(
    etcd: EtcdServer, fleet: list[ManagedProcess], profile: Path
) -> None:
    registry = etcd.url("/fleet")
    async with routing(registry) as client:
        router = client.router
        await wait_for(lambda: len(ready_urls(router)) == 2, "two engines in the pool")
        async with engine_in(registry, profile) as newcomer:
            await wait_for(lambda: newcomer.url in ready_urls(router), "the newcomer ready in the pool")
            await asyncio.gather(*(complete(client, i) for i in range(6)))
            victim = router.pool.get(newcomer.url)
            assert victim.requests == 2  # round robin over three

            started: set[int] = set()
            load = [asyncio.create_task(stream(client, i, 40, started)) for i in range(9)]
            load += [asyncio.create_task(complete(client, 100 + i, 30)) for i in range(6)]
            await wait_for(lambda: len(started) == 9 and victim.in_flight >= 3, "requests on the victim")
            newcomer.kill()
            killed = time.monotonic()
            # Out of the pool (not only unhealthy) once its lease expires: health checks never remove
            # a worker, only its registry does.
            await wait_for(lambda: newcomer.url not in urls(router), "the victim out", TTL_S + 3)
            left_after = time.monotonic() - killed
            results = await asyncio.gather(*load, return_exceptions=True)
            assert [r for r in results if r is not None] == []
            assert urls(router) == {e.url for e in fleet}
            assert left_after <= TTL_S + 3
            await asyncio.gather(*(complete(client, i) for i in range(4)))  # the rest serve on


async def test_a_graceful_stop_withdraws_at_once_and_finishes_in_flight(
    etcd: EtcdServer, fleet: list[ManagedProcess], profile: Path
) -> None:
    registry = etcd.url("/fleet")
    async with routing(registry) as client:
        router = client.router
        # A long lease: leaving quickly can only come from the withdrawal, not from the lease expiring.
        async with engine_in(registry, profile, ttl_s=60) as leaver:
            await wait_for(lambda: leaver.url in ready_urls(router), "the leaver in the pool")
            leaving = router.pool.get(leaver.url)
            started: set[int] = set()
            load = [asyncio.create_task(stream(client, i, 40, started)) for i in range(9)]
            await wait_for(lambda: len(started) == 9 and leaving.in_flight >= 2, "streams on the leaver")
            stopping = asyncio.create_task(asyncio.to_thread(leaver.stop))
            await wait_for(lambda: leaving.draining, "the leaver draining", timeout=10)
            results = await asyncio.gather(*load, return_exceptions=True)
            assert [r for r in results if r is not None] == []
            await stopping
            await wait_for(lambda: leaver.url not in urls(router), "the leaver out", timeout=10)
        await asyncio.gather(*(complete(client, i) for i in range(3)))
        assert urls(router) == {e.url for e in fleet}


async def test_etcd_down_keeps_the_fleet_and_says_so(etcd: EtcdServer, fleet: list[ManagedProcess]) -> None:
    registry = etcd.url("/fleet")
    expected = {e.url for e in fleet}
    async with routing(registry) as client:
        router = client.router
        await wait_for(lambda: ready_urls(router) == expected, "both engines in the pool")
        sync = router.discovery.syncs[0]
        etcd.stop()
        try:
            await wait_for(lambda: not sync.discovery.status.connected, "etcd reported down", 10)
            r = await client.get("/ready")
            body = await r.json()
            assert r.status == 200 and body["workers_available"] == 2
            (source,) = body["discovery"]
            assert (source["source"], source["connected"], source["workers"]) == (registry, False, 2)
            assert "etcd" in source["error"]  # why, e.g. "the etcd watch broke: transport is closing"
            metrics = await (await client.get("/metrics")).text()
            assert f'microserve_router_discovery_connected{{source="{registry}"}} 0.0' in metrics
            await asyncio.sleep(TTL_S + 1)  # past the engines' lease: nothing expires while etcd is away
            await asyncio.gather(*(complete(client, i) for i in range(6)))
            assert ready_urls(router) == expected
        finally:
            await asyncio.to_thread(etcd.start)
        await wait_for(lambda: sync.discovery.status.connected, "etcd reported back", 15)
        assert ready_urls(router) == expected
        # Followed again: a record written now joins (unhealthy: nothing listens there), then leaves.
        ghost = Registration(f"http://127.0.0.1:{free_port()}", ("smollm2-135m",))
        key = ghost.key(EtcdTarget.parse(registry).workers_prefix)
        etcd_client = EtcdClient((f"http://{etcd.endpoint}",))
        try:
            await etcd_client.put(key, ghost.to_json())
            await wait_for(lambda: ghost.url in urls(router), "a record written after the outage")
            assert ready_urls(router) == expected
            await etcd_client.delete(key)
            await wait_for(lambda: ghost.url not in urls(router), "that record deleted")
        finally:
            await etcd_client.close()


def test_the_router_command_follows_etcd(etcd: EtcdServer, fleet: list[ManagedProcess]) -> None:
    """`microserve router --discovery etcd://…` as a process: ready (and serving) on the registered fleet."""
    registry = etcd.url("/fleet")
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "router", "--port", str(port),
           "--discovery", registry]  # fmt: skip
    router = ManagedProcess(cmd, f"http://127.0.0.1:{port}")
    try:
        router.wait_ready(timeout=60)
        with urllib.request.urlopen(f"{router.url}/ready", timeout=5) as r:
            ready = orjson.loads(r.read())
        assert ready["workers_available"] == 2
        assert [(s["source"], s["connected"], s["workers"]) for s in ready["discovery"]] == [
            (registry, True, 2)
        ]
        body = orjson.dumps({"prompt": "hello", "max_tokens": 3})
        request = urllib.request.Request(f"{router.url}/v1/completions", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as r:
            assert orjson.loads(r.read())["usage"]["completion_tokens"] == 3
    finally:
        router.stop()
