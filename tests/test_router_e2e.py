"""The router in front of three real sim engines: the official openai client through data_parallel, strategy
and policy switched under load with no failure, and one engine killed under load with every request done.

The sim engines' tokens depend only on the sequence, so a stream continued on another engine must read
exactly like the same request answered by one engine; that is what the kill test checks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from microserve.processes import ManagedProcess
from microserve.router.config import RouterConfig
from microserve.router.health import HealthConfig
from microserve.router.router import Router
from microserve.router.workers import WorkerKind, WorkerSpec
from tests.fleet import MODEL, sim_fleet
from tests.router_fakes import RouterClient, serving

pytestmark = pytest.mark.slow

# 20 ms a step whatever the batch: a 40-token stream lasts about a second, long enough to be cut.
STEP_S = 0.02
DEADLINE_S = 30.0
ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ManagedProcess]]:
    with sim_fleet(tmp_path_factory.mktemp("engines"), 3, STEP_S) as started:
        yield started


@asynccontextmanager
async def routing(
    engines: list[ManagedProcess], **settings: Any
) -> AsyncIterator[tuple[RouterClient, openai.AsyncOpenAI]]:
    workers = [WorkerSpec(e.url, kind=WorkerKind.MICROSERVE) for e in engines if e.proc.poll() is None]
    router = Router(RouterConfig(workers=workers, admin_token="admin-secret", **settings))
    async with serving(router) as client:
        sdk = openai.AsyncOpenAI(base_url=f"{client.server.url}/v1", api_key="unused", max_retries=0)
        try:
            yield client, sdk
        finally:
            await sdk.close()


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Request number {i}: tell me a story."}]


async def stream_chat(
    sdk: openai.AsyncOpenAI, i: int, max_tokens: int, started: set[int] | None = None
) -> tuple[str, str | None, str]:
    """Text, finish reason and id of a streamed chat answer; every chunk must carry the same id.

    `started` collects `i` once the first words have arrived.
    """
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=messages(i),
        max_tokens=max_tokens,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    parts, reason, ids = [], None, set()
    async for chunk in stream:
        ids.add(chunk.id)
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
        if started is not None and "".join(parts):
            started.add(i)
    assert len(ids) == 1
    return "".join(parts), reason, ids.pop()


async def whole_chat(sdk: openai.AsyncOpenAI, i: int, max_tokens: int) -> str:
    r = await sdk.chat.completions.create(
        model=MODEL,
        messages=messages(i),
        max_tokens=max_tokens,
        temperature=0,  # type: ignore[arg-type]
    )
    assert r.choices[0].finish_reason == "length" and r.usage is not None
    assert r.usage.completion_tokens == max_tokens
    return r.choices[0].message.content or ""


async def test_data_parallel_with_the_official_client(engines: list[ManagedProcess]) -> None:
    async with routing(engines) as (client, sdk):
        assert [m.id for m in (await sdk.models.list()).data] == [MODEL]
        chat = await whole_chat(sdk, 1, 6)
        assert len(chat.split()) == 6  # the sim speaks in whole words, one per token
        completion = await sdk.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
        assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5
        text, reason, chat_id = await stream_chat(sdk, 1, 6)
        assert (text, reason) == (chat, "length") and chat_id.startswith("chatcmpl-")
        stream = await sdk.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=5, stream=True
        )
        streamed = "".join([c.choices[0].text async for c in stream if c.choices])
        assert streamed == completion.choices[0].text
        # round robin over three engines: each served some of the five requests
        assert all(w.requests > 0 for w in client.router.pool)
        with pytest.raises(openai.BadRequestError):
            await sdk.chat.completions.create(model=MODEL, messages=[], max_tokens=3)
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model="gpt-9", messages=messages(0), max_tokens=3)


USER_STRATEGY = """
from microserve.router.strategies import Strategy


class Labelled(Strategy):
    name = "labelled"

    async def serve(self, req):
        worker = self.pick("both", req)
        async for chunk in worker.generate(req):
            yield chunk
"""


async def test_switch_strategy_and_policy_under_load_drops_nothing(
    engines: list[ManagedProcess], tmp_path: Path
) -> None:
    path = tmp_path / "mine.py"
    path.write_text(USER_STRATEGY)
    switches = [
        ("/admin/policy", {"name": "least_connections"}),
        ("/admin/strategy", {"name": f"{path}:Labelled"}),
        # on token ids: the router loads the model's tokenizer and tokenizes each prompt as the engine does
        ("/admin/policy", {"name": "prefix_aware", "options": {"min_match": 16, "tokens": True}}),
        ("/admin/policy", {"name": "power_of_two"}),
        ("/admin/strategy", {"name": "data_parallel"}),
        ("/admin/policy", {"name": "least_loaded"}),
    ]
    async with routing(engines) as (client, sdk):
        router = client.router
        done: list[int] = []
        stop = asyncio.Event()

        async def one(i: int) -> None:
            if i % 2:
                text, reason, _ = await stream_chat(sdk, i, 12)
                assert reason == "length" and len(text.split()) == 12
            else:
                assert len((await whole_chat(sdk, i, 12)).split()) == 12
            done.append(i)

        async def client_loop(k: int) -> None:
            i = k
            while not stop.is_set():
                await one(i)
                i += 8

        load = [asyncio.create_task(client_loop(k)) for k in range(8)]
        for path_, body in switches:
            await wait_for(lambda: router.admission.running >= 4, "requests in flight")
            resp = await client.put(path_, json=body, headers=ADMIN)
            assert resp.status == 200, await resp.text()
            # Let the new choice serve a round of requests before the next switch.
            served = len(done) + 8
            await wait_for(lambda: len(done) >= served, "requests served after the switch")  # noqa: B023
        stop.set()
        results = await asyncio.gather(*load, return_exceptions=True)
        assert [r for r in results if r is not None] == []
        assert (router.strategy.name, router.policy.name) == ("data_parallel", "least_loaded")
        picked = {policy for policy, _ in router.decisions}
        assert picked == {"round_robin", "least_connections", "prefix_aware", "power_of_two", "least_loaded"}


async def test_killing_one_of_three_engines_under_load_fails_nothing(engines: list[ManagedProcess]) -> None:
    health = HealthConfig(interval_s=0.2, timeout_s=1.0)
    async with routing(engines, health=health) as (client, sdk):
        router = client.router
        victim = router.pool.get(engines[0].url)
        started: set[int] = set()
        streams = [asyncio.create_task(stream_chat(sdk, i, 40, started)) for i in range(12)]
        wholes = [asyncio.create_task(whole_chat(sdk, 100 + i, 30)) for i in range(9)]
        # Kill it once every stream has words out and it still holds several: some are cut half-way.
        await wait_for(
            lambda: len(started) == 12 and victim.in_flight >= 4, "streams in flight on the victim"
        )
        engines[0].kill()
        streamed = await asyncio.gather(*streams, return_exceptions=True)
        whole = await asyncio.gather(*wholes, return_exceptions=True)
        assert [r for r in [*streamed, *whole] if isinstance(r, BaseException)] == []
        continued = router.metrics.registry.get_sample_value(
            "microserve_router_stream_continuations_total", {"outcome": "completed"}
        )
        assert continued and continued >= 1
        # Each stream reads as if no engine had died: the same as its request answered whole now.
        reference = await asyncio.gather(*(whole_chat(sdk, i, 40) for i in range(len(streamed))))
        assert [(text, reason) for text, reason, _ in streamed] == [(r, "length") for r in reference]
        assert not victim.available
