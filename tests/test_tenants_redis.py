"""Keys and limits shared through a real Redis: the store itself, then two router processes that count
one key's requests together and both refuse a key revoked on either."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from microserve.processes import ManagedProcess, free_port
from microserve.tenants.cache import RedisCache
from microserve.tenants.keys import KeyRecord, digest
from microserve.tenants.redis_store import RedisStore
from tests.tenant_fleet import ADMIN, ADMIN_TOKEN, MODEL, start_engine, start_redis

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    yield from start_redis()


async def test_redis_store_keys_and_counters(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="unit:")
    try:
        record, secret = KeyRecord.create({"tenant": "acme", "models": ["m"], "rpm": 3})
        await store.put_key(record)
        assert await store.key_by_hash(digest(secret)) == record
        assert await store.key_by_id(record.id) == record
        assert [r.id for r in await store.keys()] == [record.id]
        assert [await store.add("c", n, 60) for n in (2, 3, -1)] == [2, 5, 4]
        assert await store.delete_key(record.id) and not await store.delete_key(record.id)
        assert await store.key_by_hash(digest(secret)) is None
    finally:
        await store.close()


async def test_redis_cache_entries_expire(redis_url: str) -> None:
    cache = RedisCache(redis_url, ttl_s=0.2, prefix="unit-cache:")
    try:
        await cache.put("k", b"Janswer")
        assert await cache.get("k") == b"Janswer"
        deadline = time.monotonic() + 5
        while await cache.get("k") is not None:
            assert time.monotonic() < deadline, "the entry never expired"
            await asyncio.sleep(0.05)
    finally:
        await cache.close()


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[list[ManagedProcess]]:
    engine_gen = start_engine(tmp_path_factory.mktemp("redis-fleet"))
    engine = next(engine_gen)
    started: list[ManagedProcess] = []
    try:
        for _ in range(2):
            port = free_port()
            cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "router",
                   "--port", str(port), "--worker", f"{engine.url},kind=microserve", "--api-keys", redis_url,
                   "--response-cache", redis_url,
                   "--admin-token", ADMIN_TOKEN]  # fmt: skip
            started.append(ManagedProcess(cmd, f"http://127.0.0.1:{port}"))
        for router in started:
            router.wait_ready(timeout=60)
        yield started
    finally:
        for router in started:
            router.stop()
        engine_gen.close()


async def admin(method: str, url: str, json: dict | None = None) -> dict:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=json, headers=ADMIN) as r,
    ):
        assert r.status in (200, 201), await r.text()
        return await r.json()


@pytest.mark.slow
async def test_two_routers_share_limits_and_revocation(routers: list[ManagedProcess]) -> None:
    a, b = routers
    made = await admin("POST", f"{a.url}/admin/keys", {"tenant": "acme", "rpm": 3})
    clients = [
        openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key=made["key"], max_retries=0) for r in routers
    ]
    try:
        for client in (clients[0], clients[1], clients[0]):  # three requests, split over both replicas
            await client.chat.completions.create(**CHAT)
        with pytest.raises(openai.RateLimitError) as refused:
            await clients[1].chat.completions.create(**CHAT)
        assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "0"

        other = await admin("POST", f"{b.url}/admin/keys", {"tenant": "other"})
        sdk = openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key=other["key"], max_retries=0)
        await sdk.chat.completions.create(**CHAT)  # made on B, accepted on A
        await admin("DELETE", f"{b.url}/admin/keys/{other['id']}")
        with pytest.raises(openai.AuthenticationError):
            await sdk.chat.completions.create(**CHAT)  # revoked on B, refused on A at once
        await sdk.close()
        assert {k["tenant"] for k in (await admin("GET", f"{a.url}/admin/keys"))["data"]} == {"acme"}
    finally:
        for client in clients:
            await client.close()


@pytest.mark.slow
async def test_two_routers_share_the_response_cache(routers: list[ManagedProcess]) -> None:
    a, b = routers
    key = (await admin("POST", f"{a.url}/admin/keys", {"tenant": "cached"}))["key"]
    stranger = (await admin("POST", f"{a.url}/admin/keys", {"tenant": "stranger"}))["key"]
    body = {**CHAT, "messages": [{"role": "user", "content": "shared cache"}]}
    seen = []
    for router, secret in ((a, key), (b, key), (b, stranger)):
        async with openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=secret, max_retries=0) as sdk:
            raw = await sdk.chat.completions.with_raw_response.create(**body)
            seen.append(raw.headers["x-microserve-cache"])
    assert seen == ["miss", "hit", "miss"]


@pytest.mark.slow
async def test_redis_down_fails_no_request_of_a_known_key(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Redis stops: a key seen before still works (limits counted locally), changing keys is a 503."""
    from tests.tenant_fleet import gateway, new_key, sdk

    redis_gen = start_redis()
    url = next(redis_gen)
    engine_gen = start_engine(tmp_path_factory.mktemp("redis-down"))
    engine = next(engine_gen)
    try:
        async with gateway(engine, api_keys=url) as client:
            key = await new_key(client, rpm=2)
            async with sdk(client, key) as api:
                await api.chat.completions.create(**CHAT)
                redis_gen.close()  # redis-server stops
                await api.chat.completions.create(**CHAT)  # served from this replica's copy of the key
                await api.chat.completions.create(**CHAT)
                with pytest.raises(openai.RateLimitError):
                    await api.chat.completions.create(**CHAT)  # local counting: 2 a minute still holds
                async with sdk(client, "sk-ms-never-seen") as stranger:
                    with pytest.raises(openai.AuthenticationError):
                        await stranger.chat.completions.create(**CHAT)
            async with client.post("/admin/keys", json={"tenant": "x"}, headers=ADMIN) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "5"
                assert (await resp.json())["error"]["code"] == "store_unavailable"
    finally:
        redis_gen.close()
        engine_gen.close()
