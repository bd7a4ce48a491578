"""Prefix hand-off between two real engine processes (sim backend): the leaving engine's hottest prefixes
move to the survivor through prep_recv / remote_send / release; the survivor then hits its prefix cache,
the router's prefix index points there, and neither engine keeps a block."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from microserve.engine_client import EngineClient, EngineError
from microserve.processes import engine_fleet, free_port
from microserve.router.handoff import EnginePeer, HandoffConfig, hand_off
from microserve.router.policies import PrefixAware

pytestmark = pytest.mark.slow

TOKEN = "handoff-internal-token"
ENV = {"MICROSERVE_INTERNAL_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def urls():
    with engine_fleet(2, "--backend", "sim", "--max-model-len", "2048", env=ENV) as pair:
        yield pair


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


async def idle(*clients: EngineClient, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        loads = [await c.load() for c in clients]
        if all(ld["kv_blocks_free"] == ld["kv_blocks_total"] and ld["kv_reservations"] == 0 for ld in loads):
            return
        assert time.monotonic() < deadline, f"blocks still held: {loads}"
        await asyncio.sleep(0.05)


async def cached(client: EngineClient, prompt: list[int]) -> int:
    out = await client.completions(prompt=prompt, max_tokens=1)
    return int(out["usage"]["prompt_tokens_details"]["cached_tokens"])


async def test_hot_prefixes_move_to_the_survivor_and_hit_its_cache(urls: list[str]) -> None:
    leaving, survivor = (EngineClient(u, internal_token=TOKEN) for u in urls)
    try:
        doc = ids(1, 160)  # 10 blocks of 16, asked three times on the leaving engine
        for i in range(3):
            await leaving.completions(prompt=[*doc, *ids(10 + i, 20)], max_tokens=2)
        assert await survivor.hot_prefixes() == []  # the survivor never saw the document
        policy = PrefixAware(tokens=True, min_match=16)
        policy.index.insert(policy.index.hashes(doc), leaving.url)

        result = await hand_off(EnginePeer(leaving), EnginePeer(survivor), HandoffConfig(max_tokens=4096))
        assert result.error is None, result.error
        assert result.prefixes and result.prefixes[0][: len(doc)] == doc
        assert result.sent_tokens > 0 and result.sent_bytes > result.sent_tokens
        policy.handed_off(leaving.url, survivor.url, result.prefixes)

        await idle(leaving, survivor)  # no block held on either side after the hand-off
        question = [*doc, *ids(99, 20)]
        assert await cached(survivor, question) >= len(doc)  # a prefix-cache hit on the survivor
        assert policy.index.match(policy.index.hashes(question)) == {survivor.url: len(doc) // 16}
        await idle(leaving, survivor)
    finally:
        await leaving.close()
        await survivor.close()


async def test_bounded_and_a_failing_survivor_ends_it_cleanly(urls: list[str]) -> None:
    leaving, survivor = (EngineClient(u, internal_token=TOKEN) for u in urls)
    try:
        for seed in (20, 21, 22):
            await leaving.completions(prompt=ids(seed, 64), max_tokens=2)
        small = await hand_off(EnginePeer(leaving), EnginePeer(survivor), HandoffConfig(max_tokens=64))
        assert small.error is None and sum(len(p) for p in small.prefixes) <= 64
        stranger = EngineClient(leaving.url)  # no internal token: the cache's contents are not for it
        with pytest.raises(EngineError) as refused:
            await stranger.hot_prefixes()
        assert refused.value.status == 401
        await stranger.close()
        gone = EngineClient(f"http://127.0.0.1:{free_port()}", internal_token=TOKEN)
        failed = await hand_off(EnginePeer(leaving), EnginePeer(gone), HandoffConfig())
        assert failed.error and not failed.prefixes
        await gone.close()
        await idle(leaving, survivor)
    finally:
        await leaving.close()
        await survivor.close()
