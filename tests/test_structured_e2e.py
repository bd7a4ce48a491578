"""Structured output through the router over two real torch engines, with the official `openai` client:
every json_schema answer validates against its schema, json_object parses, a choice is one of the
choices, a regex matches; through every strategy (the grammar travels with start_generate); a bad
schema or regex is a 400 naming the field; and a constrained stream whose engine is killed mid-answer
is continued on the other engine, whose matcher is rebuilt from the tokens already streamed."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import jsonschema
import openai
import pytest

from microserve.processes import ManagedProcess, start_engine
from microserve.router.app import RouterServer
from microserve.router.config import RouterConfig
from microserve.router.health import HealthConfig
from microserve.router.router import Router
from microserve.router.workers import WorkerKind, WorkerSpec

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
ENGINE_ARGS = ("--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory", "128MiB")
TOKEN = "test-internal-token"  # the engines authenticate each other before KV moves (pd, migration)
ASK = [{"role": "user", "content": "Give me a person as JSON with a name and an age."}]
GREEDY: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_tokens": 40}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
COLORS = ["red", "green", "blue"]
PHONE = r"[0-9]{3}-[0-9]{4}"


@pytest.fixture(scope="module")
def engines() -> Iterator[list[ManagedProcess]]:
    env = {"MICROSERVE_INTERNAL_TOKEN": TOKEN}
    started = [start_engine(*ENGINE_ARGS, env=env, timeout=300) for _ in range(2)]
    try:
        yield started
    finally:
        for e in started:
            e.stop()


@asynccontextmanager
async def routed(
    engines: list[ManagedProcess], strategy: str, **options: Any
) -> AsyncIterator[tuple[openai.AsyncOpenAI, Router]]:
    workers = [WorkerSpec(e.url, kind=WorkerKind.MICROSERVE) for e in engines]
    config = RouterConfig(
        workers=workers,
        strategy=strategy,
        strategy_options=options,
        internal_token=TOKEN,
        health=HealthConfig(interval_s=0.2, timeout_s=1.0),
    )
    router = Router(config)
    async with RouterServer(router) as server:
        sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        try:
            yield sdk, router
        finally:
            await sdk.close()


@pytest.mark.parametrize("strategy", ["data_parallel", "pd"])
async def test_answers_match_their_schema_choice_and_regex(
    engines: list[ManagedProcess], strategy: str
) -> None:
    async with routed(engines, strategy) as (sdk, _):
        r = await sdk.chat.completions.create(messages=ASK, response_format=PERSON_FORMAT, **GREEDY)  # type: ignore[arg-type]
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), PERSON)
        # streamed, and two choices (each its own matcher)
        stream = await sdk.chat.completions.create(
            messages=ASK, response_format={"type": "json_object"}, stream=True, n=2, **GREEDY
        )
        texts = ["", ""]
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
        assert all(isinstance(json.loads(t), dict) for t in texts)
        picked = await sdk.chat.completions.create(
            messages=[{"role": "user", "content": "Name a color."}],
            extra_body={"guided_choice": COLORS},
            **GREEDY,
        )
        assert picked.choices[0].message.content in COLORS
        phone = await sdk.completions.create(
            prompt="My phone number is", extra_body={"structured_outputs": {"regex": PHONE}}, **GREEDY
        )
        assert re.fullmatch(PHONE, phone.choices[0].text)
        legacy = await sdk.completions.create(
            prompt="Alice's record:", extra_body={"guided_json": PERSON}, **GREEDY
        )
        jsonschema.validate(json.loads(legacy.choices[0].text), PERSON)


@pytest.mark.parametrize(
    ("strategy", "options"),
    [("pd_cache_aware", {"min_transfer": 0}), ("pd_balanced", {}), ("migration", {"max_in_flight": 0})],
)
async def test_every_strategy_carries_the_grammar(
    engines: list[ManagedProcess], strategy: str, options: dict[str, Any]
) -> None:
    async with routed(engines, strategy, **options) as (sdk, _):
        for stream in (False, True):
            r = await sdk.chat.completions.create(
                messages=[{"role": "user", "content": "Name a color."}],
                extra_body={"guided_choice": COLORS},
                stream=stream,
                **GREEDY,
            )
            if stream:
                text = "".join([c.choices[0].delta.content or "" async for c in r if c.choices])  # type: ignore[union-attr]
            else:
                text = r.choices[0].message.content  # type: ignore[union-attr]
            assert text in COLORS  # free text otherwise: the grammar reached the engine that decoded


async def test_a_bad_schema_or_regex_is_a_400_naming_the_field(engines: list[ManagedProcess]) -> None:
    async with routed(engines, "data_parallel") as (sdk, _):
        cases: list[tuple[dict[str, Any], str]] = [
            (
                {
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "x", "schema": {"type": "nope"}},
                    }
                },
                "response_format.json_schema.schema",
            ),
            ({"guided_regex": "a(b"}, "guided_regex"),
            ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs.grammar"),
            ({"response_format": {"type": "yaml"}}, "response_format.type"),
            ({"guided_choice": COLORS, "response_format": {"type": "json_object"}}, "guided_choice"),
        ]
        for body, param in cases:
            with pytest.raises(openai.BadRequestError) as info:
                await sdk.chat.completions.create(messages=ASK, extra_body=body, **GREEDY)
            assert info.value.body["param"] == param, body  # type: ignore[index]


# Kills one of the module's engines: keep it the last test of the module.
async def test_a_constrained_stream_survives_its_engine_killed_mid_answer(
    engines: list[ManagedProcess],
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "hobbies": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": 3,
                "maxItems": 3,
            },
        },
        "required": ["name", "hobbies"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    asks = [{"role": "user", "content": "Describe a person and their three hobbies as JSON."}]
    async with routed(engines, "data_parallel") as (sdk, router):
        stream = await sdk.chat.completions.create(
            messages=asks,
            response_format=fmt,  # type: ignore[arg-type]
            stream=True,
            **{**GREEDY, "max_tokens": 60},
        )
        text, killed = "", False
        async for chunk in stream:
            text += "".join(c.delta.content or "" for c in chunk.choices)
            if text and not killed:  # mid-answer: kill the engine this stream runs on
                deadline = time.monotonic() + 10
                while not any(router.pool.get(e.url).in_flight for e in engines):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                victim = next(e for e in engines if router.pool.get(e.url).in_flight)
                victim.kill()
                killed = True
        assert killed
        continued = router.metrics.registry.get_sample_value(
            "microserve_router_stream_continuations_total", {"outcome": "completed"}
        )
        assert continued == 1.0
        jsonschema.validate(json.loads(text), schema)
