"""The engine's OpenAI-compatible HTTP API against a deterministic fake engine, over loopback.

Exact JSON and SSE shapes, every bad input, overload, disconnects, metrics, and the official openai client.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from unittest import mock

import aiohttp
import openai
import orjson
import pytest

from microserve.http.server import Request
from microserve.server.app import create_app
from microserve.server.handlers import ClientDisconnected, prepare, serve
from microserve.server.prompt_limits import prompt_body_limit
from microserve.server.protocol import CompletionRequest, parse_request
from tests.engine_serving import client_of
from tests.fake_engine import BOS, FakeEngine

REPLY = "Hello, world!"
DEADLINE_S = 5.0


@asynccontextmanager
async def serving(engine: FakeEngine, **kwargs: Any) -> AsyncIterator[aiohttp.ClientSession]:
    async with client_of(create_app(engine, **kwargs)) as client:
        yield client


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(reply=REPLY)


def without_volatile(body: dict[str, Any]) -> dict[str, Any]:
    assert body["system_fingerprint"] == "microserve"
    return {k: v for k, v in body.items() if k not in ("id", "created", "system_fingerprint")}


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def sse_events(resp: Any) -> list[Any]:
    """Every `data:` payload of an SSE body, decoded, with the literal "[DONE]" kept as a string."""
    assert resp.headers["Content-Type"] == "text/event-stream"
    raw = (await resp.read()).decode()
    assert raw.endswith("\n\n")
    events = []
    for frame in raw.split("\n\n")[:-1]:
        assert frame.startswith("data: "), frame
        payload = frame[len("data: ") :]
        events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return events


# ------------------------------------------------------------------------------------------ plain routes


async def test_models_health_ready_load(engine: FakeEngine) -> None:
    async with serving(engine, served_model_names=["fake-model", "alias"]) as client:
        resp = await client.get("/v1/models")
        assert resp.status == 200
        body = await resp.json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["fake-model", "alias"]
        first = body["data"][0]
        assert first["object"] == "model" and first["owned_by"] == "microserve"
        assert isinstance(first["created"], int) and first["max_model_len"] == 64

        assert (await client.get("/health")).status == 200
        resp = await client.get("/ready")
        assert resp.status == 200 and await resp.json() == {"ready": True}
        engine.ready = False
        resp = await client.get("/ready")
        assert resp.status == 503 and await resp.json() == {"ready": False}
        assert (await client.get("/health")).status == 200

        resp = await client.get("/load")
        assert resp.status == 200
        assert await resp.json() == engine.load()


# ------------------------------------------------------------------------------------------ completions


async def test_completion_json_shape(engine: FakeEngine) -> None:
    engine.cached_tokens = 1
    async with serving(engine) as client:
        resp = await client.post(
            "/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 5}
        )
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json"
        body = await resp.json()
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    assert without_volatile(body) == {
        "object": "text_completion",
        "model": "fake-model",
        "choices": [
            {"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "length", "stop_reason": None}
        ],
        "usage": usage(prompt=3, completion=5, cached=1),
    }
    request_id, prompt_ids, params = engine.calls[0]
    assert request_id == body["id"]
    assert prompt_ids == engine.tokenizer.encode("hi") and prompt_ids[0] == BOS
    assert params.max_tokens == 5


async def test_completion_finishes_on_eos_and_defaults(engine: FakeEngine) -> None:
    async with serving(engine) as client:
        body = await (await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 100})).json()
        assert body["model"] == "fake-model"  # no model field: the default served model
        assert body["choices"][0]["text"] == REPLY
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == len(REPLY) + 1  # the EOS token counts

        await client.post("/v1/completions", json={"prompt": "hi"})
        assert engine.calls[-1][2].max_tokens == 16  # OpenAI's default for completions
        await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": None})
        assert engine.calls[-1][2].max_tokens == 64 - 3  # null: the rest of the context


@pytest.mark.parametrize(
    "prompt",
    [[BOS, 107, 108], ["hi"], [[BOS, 107, 108]]],
    ids=["token_ids", "one_text_in_list", "one_token_list_in_list"],
)
async def test_completion_prompt_forms(engine: FakeEngine, prompt: Any) -> None:
    async with serving(engine) as client:
        resp = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert resp.status == 200, await resp.text()
    assert engine.calls[0][1] == [BOS, 107, 108]


async def test_sampling_fields_reach_the_engine(engine: FakeEngine) -> None:
    body = {
        "prompt": "hi",
        "max_tokens": 7,
        "temperature": 0,
        "top_p": 0.5,
        "top_k": 20,
        "seed": 42,
        "stop": "\n",
        "stop_token_ids": [5, 6],
        "ignore_eos": True,
        "min_tokens": 2,
        "priority": -1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "user": "u1",
        "metadata": {"accepted": "and not used"},
    }
    async with serving(engine) as client:
        assert (await client.post("/v1/completions", json=body)).status == 200
        await client.post("/v1/completions", json={"prompt": "hi", "stop": ["a", "b"], "top_k": -1})
    params = engine.calls[0][2]
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (7, 0.0, 0.5, 20)
    assert (params.seed, params.stop, params.stop_token_ids) == (42, ["\n"], [5, 6])
    assert (params.ignore_eos, params.min_tokens, params.priority) == (True, 2, -1)
    assert engine.calls[1][2].priority == 0
    assert (engine.calls[1][2].stop, engine.calls[1][2].top_k) == (["a", "b"], 0)


async def test_completion_stream_shape(engine: FakeEngine) -> None:
    async with serving(engine) as client:
        resp = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
        assert resp.status == 200
        events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    assert [without_volatile(c) for c in chunks] == [
        {
            "object": "text_completion",
            "model": "fake-model",
            "choices": [
                {"index": 0, "text": t, "logprobs": None, "finish_reason": None, "stop_reason": None}
            ],
        }
        for t in "Hel"
    ] + [
        {
            "object": "text_completion",
            "model": "fake-model",
            "choices": [
                {"index": 0, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None}
            ],
        }
    ]


async def test_completion_stream_include_usage(engine: FakeEngine) -> None:
    body = {"prompt": "hi", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    async with serving(engine) as client:
        events = await sse_events(await client.post("/v1/completions", json=body))
    assert events[-1] == "[DONE]"
    *chunks, final = events[:-1]
    assert all(c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "He"
    assert without_volatile(final) == {
        "object": "text_completion",
        "model": "fake-model",
        "choices": [],
        "usage": usage(prompt=3, completion=2),
    }


# ----------------------------------------------------------------------------------------------- chat


CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


async def test_chat_json_shape(engine: FakeEngine) -> None:
    async with serving(engine) as client:
        resp = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100})
        assert resp.status == 200
        body = await resp.json()
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    template = "<s><user>hi</s><assistant>"
    prompt_len = len(template.encode())
    assert without_volatile(body) == {
        "object": "chat.completion",
        "model": "fake-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": REPLY},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": usage(prompt=prompt_len, completion=len(REPLY) + 1),
    }
    # The rendered template is encoded without adding BOS again.
    assert engine.calls[0][1] == engine.tokenizer.encode(template, add_special_tokens=False)


async def test_chat_max_tokens_fields_and_text_parts(engine: FakeEngine) -> None:
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        "name": "bob",
    }
    async with serving(engine) as client:
        await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "max_completion_tokens": 4})
        await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
        await client.post("/v1/chat/completions", json={"messages": [parts]})
    assert engine.calls[0][2].max_tokens == 4
    assert engine.calls[1][2].max_tokens == 3
    template = "<s><user>a\nb</s><assistant>"
    assert engine.calls[2][1] == engine.tokenizer.encode(template, add_special_tokens=False)
    assert engine.calls[2][2].max_tokens == 64 - len(template.encode())  # default: fill the context


async def test_chat_stream_shape_with_usage(engine: FakeEngine) -> None:
    body = {**CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    async with serving(engine) as client:
        events = await sse_events(await client.post("/v1/chat/completions", json=body))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "fake-model" for c in chunks)

    def choice(delta: dict[str, Any], reason: str | None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason, "stop_reason": None}]

    assert [(c["choices"], c["usage"]) for c in chunks[:-1]] == [
        (choice({"role": "assistant", "content": ""}, None), None),
        (choice({"content": "H"}, None), None),
        (choice({"content": "e"}, None), None),
        (choice({"content": "l"}, None), None),
        (choice({}, "length"), None),
    ]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == usage(prompt=len(b"<s><user>hi</s><assistant>"), completion=3)


async def test_chat_stream_without_usage_has_no_usage_field(engine: FakeEngine) -> None:
    async with serving(engine) as client:
        events = await sse_events(await client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
    assert events[-1] == "[DONE]"
    assert all("usage" not in c for c in events[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1]) == REPLY
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


# ----------------------------------------------------------------------------------------- bad inputs

COMPLETIONS, CHATS = "/v1/completions", "/v1/chat/completions"
BAD_REQUESTS: list[tuple[str, str, Any, int, str, str | None]] = [
    # (id, path, body (bytes: raw), status, words in the message, param)
    ("malformed_json", COMPLETIONS, b'{"prompt": "hi"', 400, "not valid JSON", None),
    ("empty_body", COMPLETIONS, b"", 400, "body is empty", None),
    ("not_an_object", COMPLETIONS, [1, 2], 400, "JSON object", None),
    ("missing_prompt", COMPLETIONS, {"max_tokens": 3}, 400, "prompt: Field required", "prompt"),
    ("prompt_wrong_type", COMPLETIONS, {"prompt": 12}, 400, "prompt must be a string", "prompt"),
    ("prompt_mixed_list", COMPLETIONS, {"prompt": [1, "a"]}, 400, "prompt must be a string", "prompt"),
    ("prompt_bool_ids", COMPLETIONS, {"prompt": [True]}, 400, "prompt must be a string", "prompt"),
    ("empty_prompt", COMPLETIONS, {"prompt": ""}, 400, "must not be empty", "prompt"),
    ("empty_prompt_ids", COMPLETIONS, {"prompt": []}, 400, "must not be empty", "prompt"),
    ("batched_empty", COMPLETIONS, {"prompt": ["a", ""]}, 400, "must not be empty", "prompt"),
    ("batched_mixed", COMPLETIONS, {"prompt": [[5], [True]]}, 400, "prompt", "prompt"),
    ("token_out_of_vocab", COMPLETIONS, {"prompt": [5, 999]}, 400, "outside the vocabulary", "prompt"),
    ("max_tokens_type", COMPLETIONS, {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens", "max_tokens"),
    (
        "max_tokens_zero",
        COMPLETIONS,
        {"prompt": "hi", "max_tokens": 0},
        400,
        "max_tokens must be at least 1",
        None,
    ),
    (
        "temperature_range",
        COMPLETIONS,
        {"prompt": "hi", "temperature": 3},
        400,
        "temperature must be in",
        None,
    ),
    ("top_p_range", COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400, "top_p must be in", None),
    ("top_k_range", COMPLETIONS, {"prompt": "hi", "top_k": -5}, 400, "top_k must be", None),
    (
        "min_over_max",
        COMPLETIONS,
        {"prompt": "hi", "max_tokens": 2, "min_tokens": 5},
        400,
        "min_tokens",
        None,
    ),
    ("empty_stop", COMPLETIONS, {"prompt": "hi", "stop": [""]}, 400, "stop strings must be non-empty", None),
    ("negative_stop_id", COMPLETIONS, {"prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids", None),
    (
        "engine_rejects",
        COMPLETIONS,
        {"prompt": "hi", "stop_token_ids": [999]},
        400,
        "stop_token_ids must be",
        None,
    ),
    ("n_0", COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n must be between 1 and 128", "n"),
    ("best_of_2", COMPLETIONS, {"prompt": "hi", "best_of": 2}, 400, "best_of must equal n", "best_of"),
    ("unknown_field", COMPLETIONS, {"prompt": "hi", "suffix": "x"}, 400, "Unrecognized", "suffix"),
    ("tool_type", CHATS, {**CHAT, "tools": [{"type": "retrieval"}]}, 400, "tools.0.type", "tools.0.type"),
    (
        "required_no_tools",
        CHATS,
        {**CHAT, "tool_choice": "required"},
        400,
        "needs at least one tool",
        "tool_choice",
    ),
    ("logprobs", COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400, "between 0 and 20", "logprobs"),
    (
        "penalty",
        COMPLETIONS,
        {"prompt": "hi", "presence_penalty": 3},
        400,
        "presence_penalty",
        "presence_penalty",
    ),
    ("stream_string", COMPLETIONS, {"prompt": "hi", "stream": "yes"}, 400, "boolean", "stream"),
    ("max_tokens_string", COMPLETIONS, {"prompt": "hi", "max_tokens": "10"}, 400, "integer", "max_tokens"),
    ("max_tokens_bool", COMPLETIONS, {"prompt": "hi", "max_tokens": True}, 400, "integer", "max_tokens"),
    (
        "max_completion_tokens_range",
        CHATS,
        {**CHAT, "max_completion_tokens": -1},
        400,
        "max_completion_tokens must be at least 1",
        "max_completion_tokens",
    ),
    ("top_logprobs_alone", CHATS, {**CHAT, "top_logprobs": 2}, 400, "needs logprobs", "top_logprobs"),
    ("logit_bias_key", COMPLETIONS, {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "token ids", "logit_bias"),
    (
        "logit_bias_vocab",
        COMPLETIONS,
        {"prompt": "hi", "logit_bias": {"9999": 1}},
        400,
        "logit_bias",
        "logit_bias",
    ),
    (
        "stream_options_no_stream",
        COMPLETIONS,
        {"prompt": "hi", "stream_options": {}},
        400,
        "stream is true",
        None,
    ),
    ("prompt_too_long", COMPLETIONS, {"prompt": "x" * 80}, 400, "maximum context length is 64", "prompt"),
    (
        "unknown_model",
        COMPLETIONS,
        {"model": "gpt-9", "prompt": "hi"},
        404,
        "`gpt-9` does not exist",
        "model",
    ),
    ("chat_no_messages", CHATS, {"messages": []}, 400, "at least one message", "messages"),
    ("chat_missing_messages", CHATS, {"model": "fake-model"}, 400, "messages: Field required", "messages"),
    (
        "chat_bad_role",
        CHATS,
        {"messages": [{"role": "wizard", "content": "x"}]},
        400,
        "role",
        "messages.0.role",
    ),
    (
        "chat_image_part",
        CHATS,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "only 'text' is",
        "messages.0.content",
    ),
    (
        "chat_template_error",
        CHATS,
        {"messages": [{"role": "user"}]},
        400,
        "chat template cannot render",
        None,
    ),
    ("chat_top_logprobs", CHATS, {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "20", "top_logprobs"),
    ("chat_n", CHATS, {**CHAT, "n": 300}, 400, "n must be", "n"),
    (
        "chat_too_long",
        CHATS,
        {"messages": [{"role": "user", "content": "x" * 80}]},
        400,
        "context",
        "messages",
    ),
    ("chat_unknown_model", CHATS, {**CHAT, "model": "nope"}, 404, "does not exist", "model"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "words", "param"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_request_then_good_request(
    engine: FakeEngine, path: str, body: Any, status: int, words: str, param: str | None
) -> None:
    async with serving(engine) as client:
        if isinstance(body, bytes):
            resp = await client.post(path, data=body, headers={"Content-Type": "application/json"})
        else:
            resp = await client.post(path, json=body)
        assert resp.status == status
        assert resp.headers["Content-Type"] == "application/json"
        error = (await resp.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert words in error["message"], error["message"]
        if param is not None:
            assert error["param"] == param
        if status == 404:
            assert error["code"] == "model_not_found"
        assert engine.running == 0

        good = await client.post(path, json={"prompt": "hi"} if path == COMPLETIONS else CHAT)
        assert good.status == 200


async def test_unknown_route_and_method_are_openai_errors(engine: FakeEngine) -> None:
    async with serving(engine) as client:
        resp = await client.post("/v1/audio/speech", json={})
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
        resp = await client.get("/v1/completions")
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]
        assert "Method Not Allowed" in (await resp.json())["error"]["message"]


# --------------------------------------------------------------------------------- overload and errors


async def test_overload_is_503_then_recovers(engine: FakeEngine) -> None:
    async with serving(engine) as client:
        engine.overloaded = True
        resp = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        error = (await resp.json())["error"]
        assert (error["type"], error["code"]) == ("server_error", "overloaded")
        engine.overloaded = False
        assert (await client.post("/v1/completions", json={"prompt": "hi"})).status == 200


async def test_max_waiting_refuses_before_the_engine(engine: FakeEngine) -> None:
    async with serving(engine, max_waiting=2) as client:
        engine.waiting = 2
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "overloaded"
        assert engine.calls == []
        engine.waiting = 1
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200


async def test_not_ready_is_503(engine: FakeEngine) -> None:
    engine.ready = False
    async with serving(engine) as client:
        resp = await client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "not_ready"


async def test_engine_dies_mid_stream_error_event_and_no_done(engine: FakeEngine) -> None:
    engine.fail_after = 2
    async with serving(engine) as client:
        events = await sse_events(await client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
        assert "[DONE]" not in events
        assert [e["choices"][0]["delta"] for e in events[:-1]] == [
            {"role": "assistant", "content": ""},
            {"content": "H"},
            {"content": "e"},
        ]
        error = events[-1]["error"]
        assert (error["type"], error["code"]) == ("server_error", "engine_dead")

        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "engine_dead"
        engine.fail_after = None
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200


async def test_shutdown_drains_ready_and_new_requests(engine: FakeEngine) -> None:
    app = create_app(engine)
    async with client_of(app) as client:
        app.start_draining()  # what `stop` does on SIGTERM before waiting for requests in flight
        assert (await client.get("/ready")).status == 503
        resp = await client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status == 503
        assert "shutting down" in (await resp.json())["error"]["message"]


async def test_a_body_over_the_context_sized_limit_is_413_before_it_is_read(engine: FakeEngine) -> None:
    app = create_app(engine)
    assert app.max_body_bytes == prompt_body_limit(engine.max_model_len)
    big = orjson.dumps({"prompt": "x" * app.max_body_bytes})
    async with client_of(app) as client:
        # A file-like body: aiohttp warns that a large bytes body may block its event loop.
        body = io.BytesIO(big)
        resp = await client.post("/v1/completions", data=body, headers={"Content-Type": "application/json"})
        assert resp.status == 413
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert f"exceeds {app.max_body_bytes} bytes" in error["message"]
    assert engine.calls == []
    async with client_of(create_app(engine)) as client:  # the connection closed; the server goes on
        assert (await client.post("/v1/completions", json={"prompt": "hi"})).status == 200


async def test_a_prompt_longer_than_the_context_can_hold_is_not_tokenized(engine: FakeEngine) -> None:
    calls: list[int] = []
    encode = engine.tokenizer.encode

    def counting_encode(text: str, add_special_tokens: bool = True) -> list[int]:
        calls.append(len(text))
        return encode(text, add_special_tokens)

    engine.tokenizer.encode = counting_encode  # type: ignore[method-assign]
    async with serving(engine) as client:
        resp = await client.post("/v1/completions", json={"prompt": "x" * 100_000})
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "context_length_exceeded"
        chat = {"messages": [{"role": "user", "content": "x" * 100_000}]}
        resp = await client.post("/v1/chat/completions", json=chat)
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "messages"
        assert calls == []
        assert (await client.post("/v1/completions", json={"prompt": "hi"})).status == 200
    assert calls == [2]


async def test_large_prompt_is_prepared_off_the_event_loop() -> None:
    engine = FakeEngine(max_model_len=200_000)
    prompt = "x" * 100_000  # a body above OFFLOAD_BODY_BYTES
    async with serving(engine) as client:
        resp = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert resp.status == 200
        chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
        assert (await client.post("/v1/chat/completions", json=chat)).status == 200
    assert len(engine.calls[0][1]) == len(prompt) + 1
    assert len(engine.calls[1][1]) == len(f"<s><user>{prompt}</s><assistant>")


# -------------------------------------------------------------------------------------------- disconnects


async def test_disconnect_mid_stream_aborts_engine_request(engine: FakeEngine) -> None:
    engine.token_delay = 0.002
    body = {"prompt": "hi", "max_tokens": 10_000, "ignore_eos": True, "stream": True}
    async with serving(engine) as client:
        resp = await client.post("/v1/completions", json=body)
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"data: ")
        resp.close()  # hang up mid-stream
        await asyncio.wait_for(engine.closed.wait(), DEADLINE_S)
        assert engine.closed_ids == [engine.calls[0][0]]
        assert engine.running == 0
        assert (await client.post("/v1/completions", json={"prompt": "hi"})).status == 200
        text = await (await client.get("/metrics")).text()
    assert 'vllm:request_success_total{finished_reason="abort",model_name="fake-model"} 1.0' in text


async def test_disconnect_while_waiting_for_non_streamed_answer(engine: FakeEngine) -> None:
    engine.token_delay = 0.002
    body = {"prompt": "hi", "max_tokens": 10_000, "ignore_eos": True}
    async with serving(engine) as client:
        pending = asyncio.create_task(client.post("/v1/completions", json=body))
        await asyncio.wait_for(engine.started.wait(), DEADLINE_S)
        pending.cancel()  # closes the client's connection
        await asyncio.wait_for(engine.closed.wait(), DEADLINE_S)
        assert engine.running == 0
        assert (await client.post("/v1/completions", json={"prompt": "hi"})).status == 200


async def test_non_streamed_answer_notices_a_closed_transport_without_handler_cancellation(
    engine: FakeEngine,
) -> None:
    # A caller that does not cancel the handler still aborts at the next engine output.
    app = create_app(engine)
    conn = mock.Mock(transport=mock.Mock(is_closing=mock.Mock(return_value=True)))
    request = Request(conn, "POST", "/v1/completions", "", {}, b"")
    state = app.state
    req = parse_request(CompletionRequest, {"prompt": "hi", "max_tokens": 50})
    with pytest.raises(ClientDisconnected):
        await serve(request, state, await prepare(state, req, 0))
    assert engine.closed.is_set() and engine.running == 0


# ------------------------------------------------------------------------------------------------ metrics


async def test_metrics_names_and_values(engine: FakeEngine) -> None:
    engine.waiting, engine.cached_tokens = 3, 2
    async with serving(engine) as client:
        assert (await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})).status == 200
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    label = 'model_name="fake-model"'
    expected_lines = [
        f"vllm:num_requests_waiting{{{label}}} 3.0",
        f"vllm:num_requests_running{{{label}}} 0.0",
        f"vllm:kv_cache_usage_perc{{{label}}} 0.25",
        f"vllm:gpu_cache_usage_perc{{{label}}} 0.25",
        f'vllm:cache_config_info{{block_size="16",{label},num_gpu_blocks="128"}} 1.0',
        f"vllm:prefix_cache_queries_total{{{label}}} 3.0",
        f"vllm:prefix_cache_hits_total{{{label}}} 2.0",
        f"vllm:prompt_tokens_total{{{label}}} 3.0",
        f"vllm:generation_tokens_total{{{label}}} 4.0",
        f'vllm:request_success_total{{finished_reason="length",{label}}} 1.0',
        f"vllm:time_to_first_token_seconds_count{{{label}}} 1.0",
        f"vllm:time_per_output_token_seconds_count{{{label}}} 1.0",
        f"vllm:e2e_request_latency_seconds_count{{{label}}} 1.0",
    ]
    lines = set(text.splitlines())
    for line in expected_lines:
        assert line in lines, line
    for name in (
        "time_to_first_token_seconds",
        "time_per_output_token_seconds",
        "e2e_request_latency_seconds",
    ):
        assert f"# TYPE vllm:{name} histogram" in text


async def test_two_apps_do_not_share_metrics() -> None:
    first, second = FakeEngine(), FakeEngine()
    async with serving(first) as client:
        await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    async with serving(second) as client:
        text = await (await client.get("/metrics")).text()
    assert 'vllm:generation_tokens_total{model_name="fake-model"} 0.0' in text


# -------------------------------------------------------------------------------------- openai SDK client


async def test_official_openai_client(engine: FakeEngine) -> None:
    async with create_app(engine) as app:
        client = openai.AsyncOpenAI(
            base_url=f"{app.url}/v1", api_key="unused", max_retries=0, timeout=DEADLINE_S
        )
        async with client:
            models = await client.models.list()
            assert [m.id for m in models.data] == ["fake-model"]

            chat = await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=50
            )
            assert chat.choices[0].message.content == REPLY
            assert chat.choices[0].finish_reason == "stop"
            assert chat.usage is not None and chat.usage.completion_tokens == len(REPLY) + 1

            completion = await client.completions.create(model="fake-model", prompt="hi", max_tokens=5)
            assert completion.choices[0].text == "Hello"
            assert completion.choices[0].finish_reason == "length"
            assert completion.usage is not None and completion.usage.prompt_tokens == 3

            stream = await client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            pieces, finish, final_usage = [], None, None
            async for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
                final_usage = chunk.usage or final_usage
            assert "".join(pieces) == REPLY and finish == "stop"
            assert final_usage is not None and final_usage.total_tokens > final_usage.completion_tokens

            text_stream = await client.completions.create(
                model="fake-model", prompt="hi", max_tokens=4, stream=True
            )
            assert "".join([c.choices[0].text async for c in text_stream]) == "Hell"

            with pytest.raises(
                openai.BadRequestError, match="Unrecognized request argument supplied: suffix"
            ):
                await client.completions.create(model="fake-model", prompt="hi", suffix="!")
            with pytest.raises(openai.NotFoundError, match="does not exist"):
                await client.chat.completions.create(
                    model="other", messages=[{"role": "user", "content": "hi"}]
                )
