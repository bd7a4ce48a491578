"""The exact response cache: units (what is cacheable, the key, LRU and TTL), then through the router
in front of a sim engine: hits whole and streamed (the same events), no-cache, tenant isolation, and
nothing kept that is an error, cut short, or not deterministic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import openai
import pytest

from microserve.processes import ManagedProcess
from microserve.tenants.cache import MemoryCache, cache_key, cacheable, stream_events
from tests.tenant_fleet import MODEL, gateway, new_key, sdk, start_engine

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "cache me"}], "temperature": 0}


def test_only_deterministic_requests_are_cacheable() -> None:
    assert cacheable({"temperature": 0}) and cacheable({"temperature": 0.7, "seed": 3})
    assert not cacheable({}) and not cacheable({"temperature": 0.5}) and not cacheable({"temperature": "0"})


def test_the_key_is_canonical_and_per_tenant() -> None:
    a = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0, "user": "u1"}
    b = {"temperature": 0, "user": "u2", "messages": [{"content": "x", "role": "user"}], "model": "m"}
    assert cache_key("t", "/v1/chat/completions", a) == cache_key("t", "/v1/chat/completions", b)
    assert cache_key("t", "/v1/chat/completions", a) != cache_key("u", "/v1/chat/completions", a)
    assert cache_key("t", "/v1/chat/completions", a) != cache_key("t", "/v1/completions", a)
    assert cache_key("t", "/v1/chat/completions", a) != cache_key(
        "t", "/v1/chat/completions", {**a, "seed": 1}
    )


async def test_memory_cache_is_lru_under_its_bound_with_a_ttl() -> None:
    now = [0.0]
    cache = MemoryCache(max_bytes=10, ttl_s=5, clock=lambda: now[0])
    await cache.put("a", b"aaaa")
    await cache.put("b", b"bbbb")
    assert await cache.get("a") == b"aaaa"  # a is now the most recent
    await cache.put("c", b"cccc")  # 12 bytes > 10: b, the least recent, goes
    assert await cache.get("b") is None and len(cache) == 2 and cache.size == 8
    await cache.put("huge", b"x" * 11)  # larger than the bound: not kept, nothing evicted for it
    assert len(cache) == 2
    now[0] = 5.0
    assert await cache.get("a") is None and cache.size == 4


def test_stream_events_split_as_sent() -> None:
    assert stream_events(b"data: {}\n\ndata: [DONE]\n\n") == [b"data: {}\n\n", b"data: [DONE]\n\n"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    yield from start_engine(tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
async def test_hits_whole_and_streamed_replay_the_same_answer(engine: ManagedProcess) -> None:
    async with gateway(engine, api_keys="memory", response_cache="memory") as client:
        async with sdk(client, await new_key(client)) as api:
            miss = await api.chat.completions.with_raw_response.create(**CHAT, max_tokens=8)
            hit = await api.chat.completions.with_raw_response.create(**CHAT, max_tokens=8)
            assert miss.headers["x-microserve-cache"] == "miss" and hit.headers["x-microserve-cache"] == "hit"
            assert hit.parse().model_dump() == miss.parse().model_dump()
            assert hit.parse().choices[0].finish_reason == "length"  # cut at max_tokens is a whole answer
            assert "x-ratelimit-limit-requests" not in hit.headers  # this key has no request limit

            streams = []
            for _ in range(2):  # the official client reads a replayed stream as it read the first
                raw = await api.chat.completions.with_raw_response.create(**CHAT, max_tokens=5, stream=True)
                chunks = [c.model_dump() async for c in raw.parse()]
                streams.append((raw.headers["x-microserve-cache"], chunks))
            assert [s[0] for s in streams] == ["miss", "hit"] and streams[0][1] == streams[1][1]
            assert len(streams[1][1]) >= 5

            fresh = await api.chat.completions.with_raw_response.create(
                **CHAT, max_tokens=8, extra_headers={"Cache-Control": "no-cache"}
            )
            assert fresh.headers["x-microserve-cache"] == "miss"

        body = {**CHAT, "max_tokens": 6, "stream": True}
        key = await new_key(client)
        headers = {"Authorization": f"Bearer {key}"}
        sent = []
        for _ in range(2):
            async with client.post("/v1/chat/completions", json=body, headers=headers) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
                sent.append((resp.headers["x-microserve-cache"], await resp.read()))
        assert [s[0] for s in sent] == ["miss", "hit"]
        async with client.get("/metrics") as resp:
            text = await resp.text()
        assert 'microserve_router_response_cache_lookups_total{result="hit"} 3.0' in text
        assert 'microserve_router_response_cache_lookups_total{result="miss"} 4.0' in text
        assert sent[0][1] == sent[1][1] and sent[1][1].endswith(b"data: [DONE]\n\n")


@pytest.mark.slow
async def test_no_tenant_receives_another_tenants_answer(engine: ManagedProcess) -> None:
    async with gateway(engine, api_keys="memory", response_cache="memory") as client:
        first = await new_key(client, tenant="acme")
        second = await new_key(client, tenant="globex")
        same_tenant = await new_key(client, tenant="acme")
        async with sdk(client, first) as a, sdk(client, second) as b, sdk(client, same_tenant) as a2:
            await a.chat.completions.create(**CHAT, max_tokens=4)
            other = await b.chat.completions.with_raw_response.create(**CHAT, max_tokens=4)
            assert other.headers["x-microserve-cache"] == "miss"
            shared = await a2.chat.completions.with_raw_response.create(**CHAT, max_tokens=4)
            assert shared.headers["x-microserve-cache"] == "hit"  # a tenant's keys share its namespace


@pytest.mark.slow
async def test_errors_cut_streams_and_sampled_answers_are_never_cached(engine: ManagedProcess) -> None:
    async with gateway(engine, response_cache="memory") as client:
        cache = client.router.response_cache
        assert cache is not None
        api = openai.AsyncOpenAI(base_url=f"{client.server.url}/v1", api_key="none", max_retries=0)
        async with api:
            for _ in range(2):
                with pytest.raises(openai.BadRequestError):  # the engine refuses it: never cached
                    await api.chat.completions.create(**{**CHAT, "temperature": 3.0}, max_tokens=4)
                sampled = await api.chat.completions.with_raw_response.create(
                    **{**CHAT, "temperature": 0.8}, max_tokens=4
                )
                assert sampled.headers["x-microserve-cache"] == "miss"
        async with client.post(
            "/v1/chat/completions", json={**CHAT, "max_tokens": 400, "stream": True}
        ) as resp:
            await resp.content.readuntil(b"\n\n")  # the first event, then the client leaves
            resp.close()
        deadline = time.monotonic() + 10
        while client.router.admission.running:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert len(cache.backend) == 0  # type: ignore[arg-type]
