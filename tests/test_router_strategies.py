"""Every built-in strategy end to end over two real torch engines: pd, pd_cache_aware, pd_balanced and
context migration must answer with the same greedy text as data_parallel, streamed or not; and strategies
loaded by name or from a file."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from microserve.processes import ManagedProcess, start_engine
from microserve.router.app import RouterServer
from microserve.router.config import RouterConfig
from microserve.router.router import Router
from microserve.router.strategies import DataParallel, Strategy, make_strategy
from microserve.router.workers import WorkerKind, WorkerSpec

MODEL = "smollm2-135m"
ENGINE_ARGS = ("--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory", "256MiB")
STRATEGIES: list[tuple[str, dict[str, Any]]] = [
    ("pd", {}),
    ("pd_cache_aware", {"min_transfer": 0}),
    ("pd_cache_aware", {"min_transfer": 4096}),  # the decode engine always computes the rest itself
    ("pd_balanced", {"ratio": 0.2}),
    ("migration", {"max_in_flight": 0}),  # every request's context moves to the other engine
]
CHAT = [
    {"role": "system", "content": "You are a helpful assistant who answers briefly. " * 6},
    {"role": "user", "content": "Why is the sky blue?"},
]
PROMPT = "The history of the printing press begins"
TOKEN = "test-internal-token"  # the engines authenticate each other with it before KV moves


@pytest.fixture(scope="module")
def engines() -> Iterator[list[ManagedProcess]]:
    started = [start_engine(*ENGINE_ARGS, env={"MICROSERVE_INTERNAL_TOKEN": TOKEN}) for _ in range(2)]
    try:
        yield started
    finally:
        for e in started:
            e.stop()


@asynccontextmanager
async def routed(engines: list[ManagedProcess], strategy: str, options: dict[str, Any]):
    workers = [WorkerSpec(e.url, kind=WorkerKind.MICROSERVE) for e in engines]
    config = RouterConfig(workers=workers, strategy=strategy, strategy_options=options, internal_token=TOKEN)
    router = Router(config)
    async with RouterServer(router) as server:
        sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        try:
            yield sdk, router
        finally:
            await sdk.close()


async def answers(sdk: openai.AsyncOpenAI) -> dict[str, str]:
    """The same four requests each time: chat and completion, whole and streamed."""
    # Not the default 16: the answer's length proves max_tokens reached the engine that generated it.
    greedy = {"max_tokens": 21, "temperature": 0, "extra_body": {"ignore_eos": True}}
    chat = await sdk.chat.completions.create(model=MODEL, messages=CHAT, **greedy)
    text = await sdk.completions.create(model=MODEL, prompt=PROMPT, **greedy)
    chat_stream = await sdk.chat.completions.create(model=MODEL, messages=CHAT, stream=True, **greedy)
    streamed_chat = "".join([c.choices[0].delta.content or "" async for c in chat_stream if c.choices])
    text_stream = await sdk.completions.create(model=MODEL, prompt=PROMPT, stream=True, **greedy)
    streamed_text = "".join([c.choices[0].text async for c in text_stream if c.choices])
    assert chat.usage.completion_tokens == text.usage.completion_tokens == 21
    return {
        "chat": chat.choices[0].message.content,
        "completion": text.choices[0].text,
        "chat_stream": streamed_chat,
        "completion_stream": streamed_text,
    }


@pytest.fixture(scope="module")
def reference(engines) -> dict[str, str]:
    async def run() -> dict[str, str]:
        async with routed(engines, "data_parallel", {}) as (sdk, _):
            return await answers(sdk)

    return asyncio.run(run())


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "options"), STRATEGIES, ids=[f"{s}{o}" for s, o in STRATEGIES])
async def test_strategy_answers_like_data_parallel(engines, reference, strategy, options):
    async with routed(engines, strategy, options) as (sdk, router):
        got = await answers(sdk)
        assert got == reference
        assert router.strategy.describe() == {"name": strategy, "options": options}
        assert all(w.in_flight == 0 for w in router.pool)


USER_STRATEGY = """
from microserve.router.strategies import DataParallel, Strategy

class Twice(Strategy):
    name = "twice"

    def __init__(self, times: int = 2):
        super().__init__()
        self.times = times

    def options(self):
        return {"times": self.times}

    async def serve(self, req):
        for _ in range(self.times):
            yield b"x"

class NotAGenerator(Strategy):
    async def serve(self, req):
        return None

class Renamed(DataParallel):  # the built-in serve (the worker's own stream), under another name
    name = "renamed"
"""


def test_strategies_by_name_and_from_a_file(tmp_path: Path) -> None:
    assert isinstance(make_strategy("data_parallel"), DataParallel)
    path = tmp_path / "mine.py"
    path.write_text(USER_STRATEGY)
    strategy = make_strategy(f"{path}:Twice", {"times": 3})
    assert isinstance(strategy, Strategy) and strategy.describe() == {
        "name": "twice",
        "options": {"times": 3},
    }
    assert make_strategy(f"{path}:Renamed").describe() == {"name": "renamed", "options": {}}
    for spec, message in [
        ("pd_magic", "unknown strategy"),
        (f"{tmp_path}/nope.py:X", "does not exist"),
        (f"{path}:Missing", "no Strategy subclass"),
        (f"{path}:NotAGenerator", "async generator"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_strategy(spec)
    with pytest.raises(ValueError, match="bad options"):
        make_strategy("data_parallel", {"ratio": 0.5})
