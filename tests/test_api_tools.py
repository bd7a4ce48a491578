"""Tools through the router over a real torch engine (the bundled model), with the official `openai`
client: tool_choice "required" always yields parseable calls to listed functions whose arguments match
their schema, a named function yields that function, streamed deltas reassemble to the whole answer's
calls, a tool-result round trip (assistant tool_calls with null content, then the tool's answer) works,
and tool_choice "none" never yields calls; through data_parallel and pd (where the router builds the
chat answer from the engine's completion stream)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import jsonschema
import openai
import pytest

from microserve.processes import ManagedProcess, start_engine
from microserve.router.app import RouterServer
from microserve.router.config import RouterConfig
from microserve.router.router import Router
from microserve.router.workers import WorkerKind, WorkerSpec

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
ENGINE_ARGS = ("--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory", "128MiB")
TOKEN = "test-internal-token"
GREEDY: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_tokens": 8}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["C", "F"]},
            },
            "required": ["city"],
            "additionalProperties": False,  # what OpenAI's strict mode requires; else a small model rambles
        },
    },
}
NOW = {
    "type": "function",
    "function": {
        "name": "now",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}
TOOLS = [WEATHER, NOW]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
ROUND_TRIP = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "clear"}'},
]
STRATEGIES = ["data_parallel", "pd"]


@pytest.fixture(scope="module")
def engine() -> Iterator[ManagedProcess]:
    started = start_engine(*ENGINE_ARGS, env={"MICROSERVE_INTERNAL_TOKEN": TOKEN}, timeout=300)
    try:
        yield started
    finally:
        started.stop()


@asynccontextmanager
async def routed(engine: ManagedProcess, strategy: str) -> AsyncIterator[openai.AsyncOpenAI]:
    workers = [WorkerSpec(engine.url, kind=WorkerKind.MICROSERVE)]
    router = Router(RouterConfig(workers=workers, strategy=strategy, internal_token=TOKEN))
    async with RouterServer(router) as server:
        sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        try:
            yield sdk
        finally:
            await sdk.close()


async def streamed(sdk: openai.AsyncOpenAI, **kwargs: Any) -> tuple[str, list[dict[str, str]], str | None]:
    """(content, calls, finish_reason) of a streamed answer, reassembled from its deltas."""
    stream = await sdk.chat.completions.create(stream=True, **kwargs)
    content, calls, reason = "", {}, None
    async for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                if d.id:
                    call["id"] = d.id
                if d.function is not None:
                    call["name"] += d.function.name or ""
                    call["arguments"] += d.function.arguments or ""
            reason = c.finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


def calls_of(message: Any) -> list[dict[str, str]]:
    return [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in message.tool_calls or []
    ]


PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}  # type: ignore[index]
QUESTIONS = ["What is the weather in Paris?", "What time is it?", "Tell me a joke."]
FORCED: dict[str, Any] = {**GREEDY, "max_tokens": 96}  # room for FORCED_MAX_CALLS short calls


def check_calls(calls: list[dict[str, str]], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call["name"] in names and call["id"]
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_required_always_calls_a_listed_function(engine: ManagedProcess, strategy: str) -> None:
    async with routed(engine, strategy) as sdk:
        for i, question in enumerate(QUESTIONS):
            sampling = {**FORCED, "temperature": 1.0, "seed": i} if i else FORCED
            ask = [{"role": "user", "content": question}]
            answer = await sdk.chat.completions.create(
                messages=ask, tools=TOOLS, tool_choice="required", **sampling
            )
            choice = answer.choices[0]
            assert choice.finish_reason == "tool_calls", choice.message
            check_calls(calls_of(choice.message), {"get_weather", "now"})
        single = await sdk.chat.completions.create(
            messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, **FORCED
        )
        assert len(single.choices[0].message.tool_calls or []) == 1


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_named_function_streams_the_same_call(engine: ManagedProcess, strategy: str) -> None:
    async with routed(engine, strategy) as sdk:
        for name in ("get_weather", "now"):
            choice_of = {"type": "function", "function": {"name": name}}
            answer = await sdk.chat.completions.create(
                messages=ASK, tools=TOOLS, tool_choice=choice_of, **FORCED
            )  # type: ignore[arg-type]
            whole = calls_of(answer.choices[0].message)
            check_calls(whole, {name})
            assert len(whole) == 1 and answer.choices[0].message.content is None
            content, calls, reason = await streamed(
                sdk, messages=ASK, tools=TOOLS, tool_choice=choice_of, **FORCED
            )
            assert content == "" and reason == "tool_calls"
            assert [(c["name"], c["arguments"]) for c in calls] == [
                (c["name"], c["arguments"]) for c in whole
            ]


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_tool_result_round_trip(engine: ManagedProcess, strategy: str) -> None:
    async with routed(engine, strategy) as sdk:
        answer = await sdk.chat.completions.create(messages=ROUND_TRIP, tools=TOOLS, **GREEDY)  # type: ignore[arg-type]
        choice = answer.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        assert choice.message.content or choice.message.tool_calls
        # the tools are in the prompt as the template renders them: the bundled one ignores them
        plain = await sdk.chat.completions.create(messages=ROUND_TRIP, **GREEDY)  # type: ignore[arg-type]
        assert answer.usage is not None and plain.usage is not None
        assert answer.usage.prompt_tokens == plain.usage.prompt_tokens
        content, calls, reason = await streamed(sdk, messages=ROUND_TRIP, tools=TOOLS, **GREEDY)
        assert content == (choice.message.content or "") and reason == choice.finish_reason
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c["name"], c["arguments"]) for c in calls_of(choice.message)
        ]


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_tool_choice_none_never_calls(engine: ManagedProcess, strategy: str) -> None:
    async with routed(engine, strategy) as sdk:
        answer = await sdk.chat.completions.create(messages=ASK, tools=TOOLS, tool_choice="none", **GREEDY)
        assert answer.choices[0].message.tool_calls is None
        assert answer.choices[0].finish_reason in ("stop", "length")
        content, calls, _ = await streamed(sdk, messages=ASK, tools=TOOLS, tool_choice="none", **GREEDY)
        assert calls == [] and content == answer.choices[0].message.content


async def test_tool_fields_are_checked(engine: ManagedProcess) -> None:
    async with routed(engine, "data_parallel") as sdk:
        with pytest.raises(openai.BadRequestError) as named:
            await sdk.chat.completions.create(
                messages=ASK,
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "nope"}},
                **GREEDY,
            )
        assert named.value.body["param"] == "tool_choice"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as shape:
            await sdk.chat.completions.create(
                messages=ASK,
                tools=[{"type": "function", "function": {"description": "no name"}}],
                **GREEDY,  # type: ignore[list-item]
            )
        assert shape.value.body["param"] == "tools.0.function.name"  # type: ignore[index]


async def test_responses_api_function_call(engine: ManagedProcess) -> None:
    """The Responses API's function tools over the same engine: a forced call comes back as a
    function_call output item, whole and streamed, and its output continues the conversation."""
    function = {"type": "function", **WEATHER["function"]}  # type: ignore[dict-item]
    forced = {"type": "function", "name": "get_weather"}
    async with routed(engine, "data_parallel") as sdk:
        response = await sdk.responses.create(
            model=MODEL, input="Weather in Paris?", tools=[function], tool_choice=forced,  # type: ignore[list-item, arg-type]
            max_output_tokens=48, temperature=0,
        )  # fmt: skip
        assert [item.type for item in response.output] == ["function_call"]
        call = response.output[0]
        assert call.name == "get_weather" and call.call_id  # type: ignore[union-attr]
        jsonschema.validate(json.loads(call.arguments), PARAMETERS["get_weather"])  # type: ignore[union-attr]
        stream = await sdk.responses.create(
            model=MODEL, input="Weather in Paris?", tools=[function], tool_choice=forced,  # type: ignore[list-item, arg-type]
            max_output_tokens=48, temperature=0, stream=True,
        )  # fmt: skip
        done = [e async for e in stream if e.type == "response.function_call_arguments.done"]
        assert [e.arguments for e in done] == [call.arguments]  # type: ignore[union-attr]
        after = await sdk.responses.create(
            model=MODEL,
            previous_response_id=response.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21C"}],  # type: ignore[union-attr]
            tools=[function],  # type: ignore[list-item]
            max_output_tokens=6,
            temperature=0,
        )
        assert after.output_text and after.status in ("completed", "incomplete")
