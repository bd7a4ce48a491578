"""Four router processes over sim engines sharing state through a real redis-server act as one router: a
prefix learned through one routes through the others to the same worker, a session sticks to one worker
whichever replica it reaches, a circuit opened on one is open on all; Redis killed and started again
fails no request; a router killed fails only its own requests, which succeed when retried elsewhere."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from microserve.processes import ManagedProcess, engine_fleet, free_port
from tests.redis_server import RedisServer
from tests.router_fakes import FakeOpenAI
from tests.tenant_fleet import write_profile

MODEL = "smollm2-135m"
TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
SYSTEM = "You are a careful assistant who answers in full sentences. " * 8  # ~480 characters

pytestmark = pytest.mark.slow


def router_cmd(port: int, engines: list[str], redis: str) -> list[str]:
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "router", "--port", str(port),
           "--policy", "prefix_aware", "--shared-state", redis, "--admin-token", TOKEN,
           "--health-interval", "0.5"]  # fmt: skip
    return cmd + [arg for url in engines for arg in ("--worker", f"{url},model={MODEL}")]


def start_router(engines: list[str], redis: str) -> ManagedProcess:
    port = free_port()
    return ManagedProcess(router_cmd(port, engines, redis), f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    profile = write_profile(tmp_path_factory.mktemp("replicas") / "profile.json", step_s=0.005)
    with engine_fleet(3, "--backend", "sim", "--sim-profile", str(profile)) as urls:
        yield urls


@pytest.fixture(scope="module")
def routers(engines: list[str], redis: RedisServer) -> Iterator[list[ManagedProcess]]:
    procs = [start_router(engines, redis.url) for _ in range(4)]
    try:
        for proc in procs:
            proc.wait_ready(timeout=120)
        yield procs
    finally:
        for proc in procs:
            proc.stop(timeout=10)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def ready(session: aiohttp.ClientSession, router: ManagedProcess) -> dict[str, Any]:
    async with session.get(f"{router.url}/ready") as resp:
        return dict((await resp.json())["shared_state"])


async def workers(session: aiohttp.ClientSession, router: ManagedProcess) -> dict[str, dict[str, Any]]:
    async with session.get(f"{router.url}/admin/workers", headers=ADMIN) as resp:
        assert resp.status == 200, await resp.text()
        return {w["url"]: w for w in (await resp.json())["workers"]}


async def idle(session: aiohttp.ClientSession, routers: list[ManagedProcess]) -> bool:
    """Nothing in flight on any replica, and every worker available to each (a health check missed on a
    loaded machine would send a session elsewhere, as it should)."""
    for router in routers:
        for w in (await workers(session, router)).values():
            if w["in_flight"] or w["remote_in_flight"] or not w["healthy"] or w["circuit"] != "closed":
                return False
    return True


async def all_shared(session: aiohttp.ClientSession, routers: list[ManagedProcess]) -> bool:
    states = [await ready(session, r) for r in routers]
    return all(s["mode"] == "shared" and s["replicas"] >= len(routers) for s in states)


async def chat(
    session: aiohttp.ClientSession,
    router: ManagedProcess,
    user: str,
    *,
    max_tokens: int = 4,
    system: str = SYSTEM,
    **headers: str,
) -> int:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    body = {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True, "messages": messages}
    async with session.post(f"{router.url}/v1/chat/completions", json=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def served_by(
    session: aiohttp.ClientSession, router: ManagedProcess, send: Callable[[], Awaitable[int]]
) -> str:
    """The worker `router` sent one request to (its admin API's request counts, before and after)."""
    before = await workers(session, router)
    assert await send() == 200
    after = await workers(session, router)
    (url,) = [u for u in after if after[u]["requests"] > before.get(u, {"requests": 0})["requests"]]
    return url


async def test_replicas_make_the_shared_choices(routers: list[ManagedProcess]) -> None:
    async with aiohttp.ClientSession() as session:
        await until(lambda: all_shared(session, routers))

        # A prefix learned through the first router routes through each other one to the same worker.
        learned = [(await ready(session, r))["prefixes_learned"] for r in routers]
        home = await served_by(session, routers[0], lambda: chat(session, routers[0], "What is a cache?"))

        async def others_learned() -> bool:
            now = [(await ready(session, r))["prefixes_learned"] for r in routers[1:]]
            return all(n > before for n, before in zip(now, learned[1:], strict=True))

        await until(others_learned)
        for i, router in enumerate(routers[1:]):
            send = lambda r=router, i=i: chat(session, r, f"What is a cache? Follow-up {i}.")  # noqa: E731
            assert await served_by(session, router, send) == home

        # A session (X-Session-ID, consistent_hash) sticks to one worker whichever replica it reaches.
        for router in routers:
            async with session.put(
                f"{router.url}/admin/policy", json={"name": "consistent_hash"}, headers=ADMIN
            ) as r:
                assert r.status == 200, await r.text()
        try:
            picks = set()
            for k in range(8):
                # One request at a time, each once every replica has seen the last one end: with counts
                # in flight the ring's bounded load may move a session on purpose (as one router would).
                await until(lambda: idle(session, routers))
                router = routers[k % len(routers)]
                send = lambda r=router, k=k: chat(session, r, f"Turn {k}", **{"X-Session-ID": "user-42"})  # noqa: E731
                picks.add(await served_by(session, router, send))
            assert len(picks) == 1
        finally:
            for router in routers:
                async with session.put(
                    f"{router.url}/admin/policy", json={"name": "prefix_aware"}, headers=ADMIN
                ):
                    pass


async def test_a_circuit_opened_on_one_replica_is_open_on_all(routers: list[ManagedProcess]) -> None:
    failing = FakeOpenAI(model=MODEL)
    failing.statuses = [500] * 1000
    url = await failing.start()
    spec = {"url": url, "kind": "openai", "models": [MODEL]}
    async with aiohttp.ClientSession() as session:
        try:
            for router in routers:
                async with session.post(f"{router.url}/admin/workers", json=spec, headers=ADMIN) as r:
                    assert r.status in (200, 201), await r.text()

            async def circuit(router: ManagedProcess) -> str:
                return str((await workers(session, router))[url]["circuit"])

            tries = iter(range(1000))

            async def opened_on_first() -> bool:
                # Short prompts that no prefix decides go round the workers; the failing one's answers
                # are retried on a sim engine, so the client never sees them.
                assert await chat(session, routers[0], f"Trip {next(tries)}", system="") == 200
                return await circuit(routers[0]) == "open"

            await until(opened_on_first, timeout=60)
            for router in routers[1:]:
                # Opened for 5 s: seen on every replica well within that.
                await until(lambda r=router: _is(circuit(r), "open"), timeout=4)
        finally:
            for router in routers:
                async with session.delete(f"{router.url}/admin/workers", params={"url": url}, headers=ADMIN):
                    pass
            await failing.stop()


async def _is(value: Awaitable[str], expected: str) -> bool:
    return await value == expected


async def test_redis_killed_and_restarted_fails_no_request(
    routers: list[ManagedProcess], redis: RedisServer
) -> None:
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession, k: int) -> None:
        n = 0
        while not stop.is_set():
            statuses.append(await chat(session, routers[(k + n) % len(routers)], f"client {k} turn {n}"))
            n += 1

    async with aiohttp.ClientSession() as session:
        await until(lambda: all_shared(session, routers))
        clients = [asyncio.create_task(client(session, k)) for k in range(4)]
        try:
            await until(lambda: _count(statuses, 8))
            redis.kill()

            async def all_degraded() -> bool:
                modes = [(await ready(session, r))["mode"] for r in routers]
                return set(modes) == {"degraded"}

            await until(all_degraded)
            served = len(statuses)
            await until(lambda: _count(statuses, served + 8))  # served on local state meanwhile
            async with session.get(f"{routers[0].url}/metrics") as resp:
                assert "microserve_router_shared_state_up 0.0" in await resp.text()

            redis.start()
            await until(lambda: all_shared(session, routers))
            served = len(statuses)
            await until(lambda: _count(statuses, served + 8))
        finally:
            stop.set()
            await asyncio.gather(*clients)
        async with session.get(f"{routers[0].url}/metrics") as resp:
            assert "microserve_router_shared_state_up 1.0" in await resp.text()
    assert statuses and set(statuses) == {200}


async def _count(statuses: list[int], n: int) -> bool:
    return len(statuses) >= n


async def test_a_killed_router_fails_only_its_own_requests(
    routers: list[ManagedProcess], engines: list[str], redis: RedisServer
) -> None:
    victim = start_router(engines, redis.url)
    try:
        await asyncio.to_thread(victim.wait_ready, 120)
        async with aiohttp.ClientSession() as session:
            await until(lambda: all_shared(session, [*routers, victim]))
            # Long answers (~2 s at 5 ms a step) in flight through the victim and through a survivor.
            on_victim = [
                asyncio.create_task(_try(chat(session, victim, f"v{k}", max_tokens=400))) for k in range(3)
            ]
            on_survivor = [
                asyncio.create_task(chat(session, routers[1], f"s{k}", max_tokens=400)) for k in range(3)
            ]

            async def streaming() -> bool:
                return sum(w["in_flight"] for w in (await workers(session, victim)).values()) >= 3

            await until(streaming)
            victim.kill()
            lost = await asyncio.gather(*on_victim)
            assert all(status is None for status in lost)  # the connection to the dead router broke
            assert await asyncio.gather(*on_survivor) == [200, 200, 200]
            # Clients retrying on another replica succeed.
            retried = [chat(session, routers[k % len(routers)], f"v{k} again") for k in range(3)]
            assert await asyncio.gather(*retried) == [200, 200, 200]
    finally:
        victim.stop(timeout=5)


async def _try(request: Awaitable[int]) -> int | None:
    try:
        return await request
    except aiohttp.ClientError:
        return None
