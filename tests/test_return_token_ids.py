"""vLLM's `return_token_ids` extension on the engine's OpenAI routes, against the deterministic fake engine.

The router relies on it to continue a stream on another engine, so every generated id must be reported.
"""

from __future__ import annotations

from typing import Any

import orjson

from microserve.server.app import create_app
from microserve.server.microserving import add_microserving_routes
from tests.engine_serving import client_of
from tests.fake_engine import EOS, FakeEngine

REPLY = "Hi!"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "return_token_ids": True}


async def post(engine: FakeEngine, path: str, body: dict[str, Any]) -> Any:
    app = create_app(engine)
    add_microserving_routes(app, engine, None)  # type: ignore[arg-type]
    async with client_of(app) as client:
        resp = await client.post(path, json=body)
        assert resp.status == 200, await resp.text()
        raw = await resp.read()
    if not body.get("stream"):
        return orjson.loads(raw)
    frames = raw.decode().split("\n\n")[:-1]
    assert frames[-1] == "data: [DONE]"
    return [orjson.loads(f.removeprefix("data: ")) for f in frames[:-1]]


def reply_ids(engine: FakeEngine) -> list[int]:
    return engine.tokenizer.encode(REPLY, add_special_tokens=False)


async def test_completion_whole_answer_carries_prompt_and_new_ids() -> None:
    engine = FakeEngine(reply=REPLY)
    body = await post(engine, "/v1/completions", {"prompt": "hi", "max_tokens": 10, "return_token_ids": True})
    choice = body["choices"][0]
    assert choice["text"] == REPLY
    assert choice["prompt_token_ids"] == engine.tokenizer.encode("hi")
    assert choice["token_ids"] == [*reply_ids(engine), EOS]  # the EOS token counts and is reported
    assert "prompt_token_ids" not in body


async def test_completion_stream_reports_every_id_once() -> None:
    engine = FakeEngine(reply=REPLY)
    chunks = await post(
        engine,
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 10, "stream": True, "return_token_ids": True},
    )
    choices = [c["choices"][0] for c in chunks]
    assert choices[0]["prompt_token_ids"] == engine.tokenizer.encode("hi")
    assert all("prompt_token_ids" not in c for c in choices[1:])
    # EOS has no text but still gets its chunk; the finish chunk adds no ids.
    assert [(c["text"], c["token_ids"]) for c in choices] == [
        *[(ch, [i]) for ch, i in zip(REPLY, reply_ids(engine), strict=True)],
        ("", [EOS]),
        ("", []),
    ]
    assert choices[-1]["finish_reason"] == "stop"


async def test_chat_whole_answer_puts_prompt_ids_at_the_top() -> None:
    engine = FakeEngine(reply=REPLY)
    body = await post(engine, "/v1/chat/completions", {**CHAT, "max_tokens": 2})
    assert body["prompt_token_ids"] == engine.calls[0][1]
    assert body["choices"][0]["token_ids"] == reply_ids(engine)[:2]
    assert body["choices"][0]["message"]["content"] == REPLY[:2]


async def test_chat_stream_opening_chunk_has_prompt_ids() -> None:
    engine = FakeEngine(reply=REPLY)
    chunks = await post(engine, "/v1/chat/completions", {**CHAT, "max_tokens": 2, "stream": True})
    assert chunks[0]["prompt_token_ids"] == engine.calls[0][1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [c["choices"][0]["token_ids"] for c in chunks] == [[], *[[i] for i in reply_ids(engine)[:2]], []]


async def test_without_the_flag_no_id_fields_appear() -> None:
    engine = FakeEngine(reply=REPLY)
    chunks = await post(engine, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True})
    assert all(
        set(c["choices"][0]) == {"index", "text", "logprobs", "finish_reason", "stop_reason"} for c in chunks
    )


async def test_start_generate_reports_every_id_when_asked() -> None:
    # What PD's decode engine answers the router, which counts the ids and continues a broken stream.
    engine = FakeEngine(reply=REPLY)
    body = {"request_id": "r1", "prompt": [5, 6, 7], "begin": 2, "max_tokens": 10, "stream": True}
    options = {"return_token_ids": True, "stream_options": {"include_usage": True}}
    chunks = await post(engine, "/microserving/start_generate", {**body, **options})
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert choices[0]["prompt_token_ids"] == [5, 6, 7]
    assert [t for c in choices for t in c["token_ids"]] == [*reply_ids(engine), EOS]
    assert chunks[-1]["usage"]["completion_tokens"] == len(REPLY) + 1
    plain = await post(engine, "/microserving/start_generate", body)
    assert all("token_ids" not in c["choices"][0] for c in plain)
