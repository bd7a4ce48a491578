"""Forced tool calls across a mid-stream continuation: two sim engines behind the router, one killed
while streams that must call a named function run on it. The grammar's state is rebuilt on the new
engine from the tokens already generated, and the sim's tokens depend only on the sequence, so each
continued stream must reassemble to exactly the call of the same request answered whole."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from microserve.processes import ManagedProcess
from microserve.router.app import RouterServer
from microserve.router.config import RouterConfig
from microserve.router.health import HealthConfig
from microserve.router.router import Router
from microserve.router.workers import WorkerKind, WorkerSpec
from tests.fleet import sim_fleet
from tests.test_api_tools import TOOLS, calls_of, streamed

pytestmark = pytest.mark.slow

ASK: dict[str, Any] = {
    "model": "smollm2-135m",
    "max_tokens": 60,
    "temperature": 0,
    "tools": TOOLS,
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ManagedProcess]]:
    with sim_fleet(tmp_path_factory.mktemp("engines"), 2, 0.06) as started:
        yield started


async def generated(http: httpx.AsyncClient) -> float:
    """The engine's generation tokens so far (its /metrics)."""
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith("vllm:generation_tokens_total"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question {i}: the weather somewhere?"}]


async def test_forced_calls_continue_exactly_after_an_engine_dies(engines: list[ManagedProcess]) -> None:
    workers = [WorkerSpec(e.url, kind=WorkerKind.MICROSERVE) for e in engines]
    router = Router(RouterConfig(workers=workers, health=HealthConfig(interval_s=0.2, timeout_s=1.0)))
    async with RouterServer(router) as server:
        sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        victim = router.pool.get(engines[0].url)
        for engine in engines:  # each compiles the grammar once, so that the streams below start at once
            direct = openai.AsyncOpenAI(base_url=f"{engine.url}/v1", api_key="unused", max_retries=0)
            await direct.chat.completions.create(messages=question(99), **{**ASK, "max_tokens": 2})
            await direct.close()
        tasks = [asyncio.create_task(streamed(sdk, messages=question(i), **ASK)) for i in range(6)]
        # kill the victim a few tokens into the answers it is streaming (its own token counter says so)
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(base_url=engines[0].url) as http:
            while victim.in_flight < 2 or await generated(http) < 2 + 2 * 5:  # 2: the warm-up's
                assert time.monotonic() < deadline, "streams did not start on the victim"
                await asyncio.sleep(0.01)
        engines[0].kill()
        results = await asyncio.gather(*tasks)
        continued = router.metrics.registry.get_sample_value(
            "microserve_router_stream_continuations_total", {"outcome": "completed"}
        )
        assert continued and continued >= 1
        for i, (content, calls, reason) in enumerate(results):
            whole = await sdk.chat.completions.create(messages=question(i), **ASK)
            expected = calls_of(whole.choices[0].message)
            assert len(expected) == 1 and expected[0]["name"] == "get_weather"
            json.loads(expected[0]["arguments"])
            assert content == "" and reason == "tool_calls"
            assert [(c["name"], c["arguments"]) for c in calls] == [
                (c["name"], c["arguments"]) for c in expected
            ]
        await sdk.close()
