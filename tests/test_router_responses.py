"""`/v1/responses` through the router over a real sim engine, with the official `openai` client: a whole
answer, a streamed one (the SDK's own event accumulation), a conversation continued by
`previous_response_id`, retrieve and delete, and the 404s and 400s in OpenAI's shape."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import openai
import pytest

from microserve.processes import ManagedProcess, free_port
from microserve.router.app import RouterServer
from microserve.router.config import RouterConfig
from microserve.router.router import Router
from microserve.router.workers import WorkerKind, WorkerSpec
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
TOKEN = "test-internal-token"  # pd moves KV between engines, which authenticate with it


@pytest.fixture(scope="module")
def engine() -> Iterator[ManagedProcess]:
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
           "--port", str(port), "--threads", "1"]  # fmt: skip
    process = ManagedProcess(cmd, f"http://127.0.0.1:{port}", env={"MICROSERVE_INTERNAL_TOKEN": TOKEN})
    try:
        process.wait_ready(timeout=180)
        yield process
    finally:
        process.stop()


@asynccontextmanager
async def client(
    engine: ManagedProcess, strategy: str = "data_parallel"
) -> AsyncIterator[openai.AsyncOpenAI]:
    workers = [WorkerSpec(engine.url, kind=WorkerKind.MICROSERVE)]
    router = Router(RouterConfig(workers=workers, strategy=strategy, internal_token=TOKEN))
    async with RouterServer(router) as server:
        sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        try:
            yield sdk
        finally:
            await sdk.close()


async def test_text_in_text_out_and_the_same_as_chat(engine: ManagedProcess) -> None:
    async with client(engine) as sdk:
        response = await sdk.responses.create(
            model=MODEL, input="Tell me a story.", max_output_tokens=8, temperature=0, metadata={"k": "v"}
        )
        chat = await sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=8,
            temperature=0,
        )
        assert response.id.startswith("resp_") and response.object == "response"
        assert response.output_text == chat.choices[0].message.content
        assert response.output[0].type == "message" and response.output[0].role == "assistant"
        assert response.usage is not None and response.usage.output_tokens == chat.usage.completion_tokens  # type: ignore[union-attr]
        assert response.usage.input_tokens == chat.usage.prompt_tokens  # type: ignore[union-attr]
        assert response.metadata == {"k": "v"}
        # 8 tokens and no EOS: cut by max_output_tokens
        assert response.status == "incomplete"
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
        again = await sdk.responses.retrieve(response.id)
        assert again.output_text == response.output_text and again.id == response.id


async def test_previous_response_id_continues_the_conversation(engine: ManagedProcess) -> None:
    async with client(engine) as sdk:
        first = await sdk.responses.create(
            model=MODEL, input="Hi.", instructions="Be brief.", max_output_tokens=5, temperature=0
        )
        second = await sdk.responses.create(
            model=MODEL, input="And then?", previous_response_id=first.id, max_output_tokens=5, temperature=0
        )
        # The same conversation sent whole as chat: what the second response must have answered.
        chat = await sdk.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "And then?"},
            ],
            max_tokens=5,
            temperature=0,
        )
        assert second.previous_response_id == first.id
        assert second.output_text == chat.choices[0].message.content
        assert second.usage is not None and second.usage.input_tokens == chat.usage.prompt_tokens  # type: ignore[union-attr]
        # the history grew: the second prompt holds the first exchange
        assert first.usage is not None and second.usage.input_tokens > first.usage.input_tokens


async def test_streaming_events_accumulate_to_the_whole_answer(engine: ManagedProcess) -> None:
    async with client(engine) as sdk:
        whole = await sdk.responses.create(model=MODEL, input="Count.", max_output_tokens=12, temperature=0)
        types = []
        async with sdk.responses.stream(
            model=MODEL, input="Count.", max_output_tokens=12, temperature=0
        ) as stream:
            async for event in stream:
                types.append(event.type)
        # cut by max_output_tokens: the last event is response.incomplete (the SDK's get_final_response
        # waits for response.completed only, as it does against OpenAI)
        assert event.type == "response.incomplete"
        final = event.response
        assert types[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert "response.output_text.delta" in types
        assert types[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete",
        ]
        assert final.output_text == whole.output_text
        assert final.usage is not None and final.usage.output_tokens == 12
        # a streamed response is kept too
        kept = await sdk.responses.retrieve(final.id)
        assert kept.output_text == whole.output_text


async def test_errors_in_openai_shape(engine: ManagedProcess) -> None:
    async with client(engine) as sdk:
        with pytest.raises(openai.NotFoundError) as missing:
            await sdk.responses.create(model=MODEL, input="Hi.", previous_response_id="resp_nope")
        assert missing.value.body["param"] == "previous_response_id"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as unknown:
            await sdk.responses.create(model=MODEL, input="Hi.", extra_body={"frobnicate": 1})
        assert unknown.value.body["param"] == "frobnicate"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as image:
            await sdk.responses.create(
                model=MODEL,
                input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}],
            )
        assert image.value.body["param"] == "input.0.content"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.create(model="no-such-model", input="Hi.")
        unstored = await sdk.responses.create(model=MODEL, input="Hi.", max_output_tokens=2, store=False)
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(unstored.id)
        kept = await sdk.responses.create(model=MODEL, input="Hi.", max_output_tokens=2)
        await sdk.responses.delete(kept.id)
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(kept.id)


async def test_message_items_through_pd(engine: ManagedProcess) -> None:
    # pd with one engine in both roles: the chat answer comes from the router's reshaped completion stream
    async with client(engine, "pd") as sdk:
        items = [
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi."}]},
        ]
        whole = await sdk.responses.create(model=MODEL, input=items, max_output_tokens=6, temperature=0)  # type: ignore[arg-type]
        stream = await sdk.responses.create(
            model=MODEL,
            input=items,
            max_output_tokens=6,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        assert whole.output_text and "".join(deltas) == whole.output_text


async def test_function_call_round_trip(engine: ManagedProcess) -> None:
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}]
    items = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "21C, clear"},
    ]
    async with client(engine) as sdk:
        response = await sdk.responses.create(
            model=MODEL,
            input=items,  # type: ignore[arg-type]
            tools=tools,  # type: ignore[arg-type]
            max_output_tokens=6,
            temperature=0,
        )
        chat = await sdk.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "21C, clear"},
            ],
            tools=[
                {
                    "type": "function",
                    "function": {"name": "get_weather", "parameters": tools[0]["parameters"]},
                }
            ],  # type: ignore[list-item]
            max_tokens=6,
            temperature=0,
        )
        assert response.output_text == chat.choices[0].message.content
        assert response.tools[0].name == "get_weather"  # type: ignore[union-attr]
        assert response.usage is not None and chat.usage is not None
        assert response.usage.input_tokens == chat.usage.prompt_tokens
        # the next turn continues after the tool's answer
        after = await sdk.responses.create(
            model=MODEL, input="Thanks!", previous_response_id=response.id, max_output_tokens=4, temperature=0
        )
        assert after.usage is not None and after.usage.input_tokens > response.usage.input_tokens


async def test_replicas_share_conversations_through_redis(engine: ManagedProcess) -> None:
    """Two routers on one Redis (--shared-state): a conversation started on one continues, is read and
    is deleted on the other."""
    redis = RedisServer().start()
    try:
        workers = [WorkerSpec(engine.url, kind=WorkerKind.MICROSERVE)]
        servers = [
            RouterServer(Router(RouterConfig(workers=workers, shared_state=redis.url))) for _ in range(2)
        ]
        for server in servers:
            await server.start()
        sdks = [
            openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=30)
            for s in servers
        ]
        try:
            first = await sdks[0].responses.create(
                model=MODEL, input="Hi.", max_output_tokens=4, temperature=0
            )
            second = await sdks[1].responses.create(
                model=MODEL, input="More.", previous_response_id=first.id, max_output_tokens=4, temperature=0
            )
            assert second.usage is not None and first.usage is not None
            assert second.usage.input_tokens > first.usage.input_tokens
            assert (await sdks[1].responses.retrieve(first.id)).output_text == first.output_text
            await sdks[1].responses.delete(first.id)
            with pytest.raises(openai.NotFoundError):
                await sdks[0].responses.retrieve(first.id)
        finally:
            for sdk in sdks:
                await sdk.close()
            for server in servers:
                await server.stop()
    finally:
        redis.kill()
