"""Logprobs across a mid-stream continuation: two sim engines behind the router, one killed while chat
streams with logprobs run on it. The sim's tokens and logprobs depend only on the sequence, so each
continued stream must carry exactly the tokens and logprobs of the same request answered whole."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from microserve.processes import ManagedProcess
from microserve.router.config import RouterConfig
from microserve.router.health import HealthConfig
from microserve.router.router import Router
from microserve.router.workers import WorkerKind, WorkerSpec
from tests.fleet import MODEL, sim_fleet
from tests.router_fakes import serving

pytestmark = pytest.mark.slow

ASK: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 40,
    "temperature": 0,
    "logprobs": True,
    "top_logprobs": 2,
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ManagedProcess]]:
    with sim_fleet(tmp_path_factory.mktemp("engines"), 2, 0.02) as started:
        yield started


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question {i}: tell me a story."}]


async def streamed(sdk: openai.AsyncOpenAI, i: int, started: set[int]) -> tuple[str, list[tuple[str, float]]]:
    stream = await sdk.chat.completions.create(messages=question(i), stream=True, **ASK)  # type: ignore[call-overload]
    text, entries = "", []
    async for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            for e in (c.logprobs.content or []) if c.logprobs else []:
                assert e.top_logprobs[0].token == e.token
                entries.append((e.token, e.logprob))
        if text:
            started.add(i)
    return text, entries


async def test_logprob_streams_continue_exactly_after_an_engine_dies(engines: list[ManagedProcess]) -> None:
    workers = [WorkerSpec(e.url, kind=WorkerKind.MICROSERVE) for e in engines]
    router = Router(RouterConfig(workers=workers, health=HealthConfig(interval_s=0.2, timeout_s=1.0)))
    async with serving(router) as client:
        sdk = openai.AsyncOpenAI(base_url=f"{client.server.url}/v1", api_key="unused", max_retries=0)
        victim = router.pool.get(engines[0].url)
        started: set[int] = set()
        tasks = [asyncio.create_task(streamed(sdk, i, started)) for i in range(6)]
        deadline = time.monotonic() + 30
        while not (len(started) == 6 and victim.in_flight >= 2):
            assert time.monotonic() < deadline, "streams did not start on the victim"
            await asyncio.sleep(0.01)
        engines[0].kill()
        results = await asyncio.gather(*tasks)
        continued = router.metrics.registry.get_sample_value(
            "microserve_router_stream_continuations_total", {"outcome": "completed"}
        )
        assert continued and continued >= 1
        for i, (text, entries) in enumerate(results):
            whole = await sdk.chat.completions.create(messages=question(i), **ASK)
            choice = whole.choices[0]
            assert choice.logprobs is not None and choice.logprobs.content is not None
            assert text == choice.message.content
            assert entries == [(e.token, e.logprob) for e in choice.logprobs.content]
            assert len(entries) == 40
        await sdk.close()
