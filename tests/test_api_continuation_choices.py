"""Streams of several choices across a mid-stream continuation: two sim engines behind the router, one
killed while chat streams with n = 3 and batched completion streams (two prompts, n = 2) run on it.
The sim's tokens depend only on the sequence and the choice, so each continued choice must carry exactly
the text of the same request answered whole, under its own index, with usage counting every choice once."""

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

TOKENS = 30
GREEDY: dict[str, Any] = {"model": MODEL, "max_tokens": TOKENS, "temperature": 0}
SEEDED: dict[str, Any] = {"model": MODEL, "max_tokens": TOKENS, "temperature": 1.0, "seed": 7}
USAGE = {"stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ManagedProcess]]:
    with sim_fleet(tmp_path_factory.mktemp("engines"), 2, 0.02) as started:
        yield started


Streamed = tuple[dict[int, str], dict[int, str], Any]


async def chat(sdk: openai.AsyncOpenAI, i: int, ask: dict[str, Any], started: set[int]) -> Streamed:
    messages = [{"role": "user", "content": f"Question {i}: tell me a story."}]
    stream = await sdk.chat.completions.create(messages=messages, stream=True, n=3, **ask, **USAGE)  # type: ignore[call-overload]
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason is not None:
                assert c.index not in reasons, "a choice finished twice"
                reasons[c.index] = c.finish_reason
            if c.delta.content:
                started.add(i)
        if chunk.usage is not None:
            assert usage is None, "usage came twice"
            usage = chunk.usage
    return texts, reasons, usage


async def batch(sdk: openai.AsyncOpenAI, i: int, ask: dict[str, Any], started: set[int]) -> Streamed:
    prompts = [f"Batch {i}, first prompt:", f"Batch {i}, second prompt, a longer one:"]
    stream = await sdk.completions.create(prompt=prompts, stream=True, n=2, **ask, **USAGE)
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                assert c.index not in reasons, "a choice finished twice"
                reasons[c.index] = c.finish_reason
            if c.text:
                started.add(i)
        if chunk.usage is not None:
            assert usage is None, "usage came twice"
            usage = chunk.usage
    return texts, reasons, usage


async def test_prompt_logprobs_come_in_the_first_chunk_of_each_choice(engines: list[ManagedProcess]) -> None:
    workers = [WorkerSpec(e.url, kind=WorkerKind.MICROSERVE) for e in engines]
    router = Router(RouterConfig(workers=workers, health=HealthConfig(interval_s=0.2, timeout_s=1.0)))
    async with serving(router) as client:
        sdk = openai.AsyncOpenAI(base_url=f"{client.server.url}/v1", api_key="unused", max_retries=0)
        ask: dict[str, Any] = {**GREEDY, "max_tokens": 5, "n": 2, "extra_body": {"prompt_logprobs": 1}}
        prompts = ["A first prompt:", "A second prompt, longer:"]
        whole = await sdk.completions.create(prompt=prompts, **ask)
        expected = {c.index: (c.model_extra or {})["prompt_logprobs"] for c in whole.choices}
        assert expected[0][0] is None and expected[0][1]  # the first prompt token has none
        seen: dict[int, list[Any]] = {}
        async for chunk in await sdk.completions.create(prompt=prompts, stream=True, **ask):
            for c in chunk.choices:
                entries = (c.model_extra or {}).get("prompt_logprobs")
                if entries is not None:
                    assert c.index not in seen, "prompt_logprobs came twice for one choice"
                    seen[c.index] = entries
                else:
                    assert c.index in seen, "a choice's first chunk had no prompt_logprobs"
        assert seen == expected

        messages = [{"role": "user", "content": "Say something."}]
        chat_whole = await sdk.chat.completions.create(messages=messages, **ask)  # type: ignore[call-overload]
        chat_expected = (chat_whole.model_extra or {})["prompt_logprobs"]
        chat_seen: dict[int, list[Any]] = {}
        stream = await sdk.chat.completions.create(messages=messages, stream=True, **ask)  # type: ignore[call-overload]
        async for chunk in stream:
            for c in chunk.choices:
                entries = (c.model_extra or {}).get("prompt_logprobs")
                if entries is not None:
                    assert c.index not in chat_seen
                    chat_seen[c.index] = entries
        assert chat_seen == {0: chat_expected, 1: chat_expected}
        await sdk.close()


async def test_choices_continue_exactly_after_an_engine_dies(engines: list[ManagedProcess]) -> None:
    workers = [WorkerSpec(e.url, kind=WorkerKind.MICROSERVE) for e in engines]
    router = Router(RouterConfig(workers=workers, health=HealthConfig(interval_s=0.2, timeout_s=1.0)))
    async with serving(router) as client:
        sdk = openai.AsyncOpenAI(base_url=f"{client.server.url}/v1", api_key="unused", max_retries=0)
        victim = router.pool.get(engines[0].url)
        started: set[int] = set()
        asks = [GREEDY, SEEDED, GREEDY, SEEDED]
        tasks = [asyncio.create_task(chat(sdk, i, asks[i], started)) for i in range(4)]
        tasks += [asyncio.create_task(batch(sdk, 10 + i, asks[i], started)) for i in range(4)]
        deadline = time.monotonic() + 30
        while not (len(started) == 8 and victim.in_flight >= 2):
            assert time.monotonic() < deadline, "streams did not start on the victim"
            await asyncio.sleep(0.01)
        engines[0].kill()
        results = await asyncio.gather(*tasks)
        continued = router.metrics.registry.get_sample_value(
            "microserve_router_stream_continuations_total", {"outcome": "completed"}
        )
        assert continued and continued >= 1

        for i, (texts, reasons, usage) in enumerate(results[:4]):
            messages = [{"role": "user", "content": f"Question {i}: tell me a story."}]
            whole = await sdk.chat.completions.create(messages=messages, n=3, **asks[i])  # type: ignore[call-overload]
            assert sorted(texts) == [0, 1, 2]
            assert {c.index: c.message.content for c in whole.choices} == texts
            assert len(set(texts.values())) == 3  # each choice its own words
            assert reasons == {c.index: c.finish_reason for c in whole.choices}
            assert usage is not None and whole.usage is not None
            assert usage.completion_tokens == 3 * TOKENS == whole.usage.completion_tokens
            assert usage.prompt_tokens == whole.usage.prompt_tokens
        for i, (texts, reasons, usage) in enumerate(results[4:]):
            prompts = [f"Batch {10 + i}, first prompt:", f"Batch {10 + i}, second prompt, a longer one:"]
            done = await sdk.completions.create(prompt=prompts, n=2, **asks[i])
            assert sorted(texts) == [0, 1, 2, 3]
            assert {c.index: c.text for c in done.choices} == texts
            assert reasons == {c.index: c.finish_reason for c in done.choices}
            assert usage is not None and done.usage is not None
            assert usage.completion_tokens == 4 * TOKENS == done.usage.completion_tokens
            assert usage.prompt_tokens == done.usage.prompt_tokens
        await sdk.close()
