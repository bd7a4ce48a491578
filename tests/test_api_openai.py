"""The OpenAI API through the router over two real torch engines, with the official `openai` client:
each sampling control changes the answer as it should, through data_parallel and through pd (where
the router turns the decode engine's completion stream into the client's chat answer)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
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
CHAT = [{"role": "user", "content": "List three colors."}]
PROMPT = "The three primary colors are"
GREEDY: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_tokens": 6}
TOKEN = "test-internal-token"  # the engines authenticate each other with it before KV moves (pd)


@pytest.fixture(scope="module")
def engines() -> Iterator[list[ManagedProcess]]:
    # Up to 5 minutes each: a torch engine's start on a loaded 2-core machine can pass 2.
    env = {"MICROSERVE_INTERNAL_TOKEN": TOKEN}
    started = [start_engine(*ENGINE_ARGS, env=env, timeout=300) for _ in range(2)]
    try:
        yield started
    finally:
        for e in started:
            e.stop()


@asynccontextmanager
async def routed(
    engines: list[ManagedProcess], strategy: str
) -> AsyncIterator[tuple[openai.AsyncOpenAI, str]]:
    workers = [WorkerSpec(e.url, kind=WorkerKind.MICROSERVE) for e in engines]
    router = Router(RouterConfig(workers=workers, strategy=strategy, internal_token=TOKEN))
    async with RouterServer(router) as server:
        sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        try:
            yield sdk, server.url
        finally:
            await sdk.close()


STRATEGIES = ["data_parallel", "pd"]


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_logit_bias_and_logprobs(engines: list[ManagedProcess], strategy: str) -> None:
    async with routed(engines, strategy) as (sdk, _):
        plain = await sdk.chat.completions.create(
            messages=CHAT, logprobs=True, top_logprobs=3, extra_body={"return_token_ids": True}, **GREEDY
        )
        choice = plain.choices[0]
        assert plain.system_fingerprint == "microserve"
        first_id = choice.model_extra["token_ids"][0]  # type: ignore[index]
        # the greedy token's logprob is the top logprob, every step
        assert choice.logprobs is not None and choice.logprobs.content
        for entry in choice.logprobs.content:
            assert len(entry.top_logprobs) == 3
            assert entry.token == entry.top_logprobs[0].token
            assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        text = "".join(e.token for e in choice.logprobs.content)
        assert text == choice.message.content
        banned = await sdk.chat.completions.create(
            messages=CHAT, logit_bias={str(first_id): -100}, extra_body={"return_token_ids": True}, **GREEDY
        )
        assert banned.choices[0].model_extra["token_ids"][0] != first_id  # type: ignore[index]
        # completions: the same through the other endpoint, streamed
        stream = await sdk.completions.create(prompt=PROMPT, logprobs=2, stream=True, **GREEDY)
        tokens, streamed = [], []
        async for chunk in stream:
            if chunk.choices:
                streamed.append(chunk.choices[0].text)
                if chunk.choices[0].logprobs is not None:
                    lp = chunk.choices[0].logprobs
                    assert lp.top_logprobs is not None
                    for token, top in zip(lp.tokens or [], lp.top_logprobs, strict=True):
                        assert max(top, key=top.__getitem__) == token
                    tokens.extend(lp.tokens or [])
        assert "".join(tokens) == "".join(streamed) and len(tokens) == 6


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_n_choices_and_batched_prompts(engines: list[ManagedProcess], strategy: str) -> None:
    async with routed(engines, strategy) as (sdk, _):
        r = await sdk.chat.completions.create(messages=CHAT, n=3, **GREEDY)
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert len({c.message.content for c in r.choices}) == 1  # greedy: the same three times
        assert r.usage is not None and r.usage.completion_tokens == 3 * 6
        stream = await sdk.chat.completions.create(
            messages=CHAT,
            n=3,
            stream=True,
            stream_options={"include_usage": True},
            **{**GREEDY, "temperature": 1},
        )
        texts: dict[int, str] = {}
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
        assert sorted(texts) == [0, 1, 2] and all(texts.values())
        batch = await sdk.completions.create(prompt=[PROMPT, "Once upon a time"], n=2, echo=True, **GREEDY)
        assert [c.index for c in batch.choices] == [0, 1, 2, 3]
        assert batch.choices[0].text.startswith(PROMPT) and batch.choices[2].text.startswith(
            "Once upon a time"
        )
        assert batch.choices[0].text == batch.choices[1].text != batch.choices[2].text
        scored = await sdk.completions.create(prompt=PROMPT, extra_body={"prompt_logprobs": 1}, **GREEDY)
        entries = scored.choices[0].model_extra["prompt_logprobs"]  # type: ignore[index]
        assert entries[0] is None and len(entries) == scored.usage.prompt_tokens  # type: ignore[union-attr]
        assert all(1 <= len(e) <= 2 and all(v["rank"] >= 1 for v in e.values()) for e in entries[1:])
        chat_scored = await sdk.chat.completions.create(
            messages=CHAT, extra_body={"prompt_logprobs": 0}, **GREEDY
        )
        assert len(chat_scored.model_extra["prompt_logprobs"]) == chat_scored.usage.prompt_tokens  # type: ignore[index,union-attr]


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_stop_fields_and_special_tokens(engines: list[ManagedProcess], strategy: str) -> None:
    async with routed(engines, strategy) as (sdk, _):
        plain = await sdk.completions.create(prompt=PROMPT, **GREEDY)
        stop = plain.choices[0].text.split()[1]
        kept = await sdk.completions.create(
            prompt=PROMPT, stop=[stop], extra_body={"include_stop_str_in_output": True}, **GREEDY
        )
        assert kept.choices[0].text.endswith(stop) and kept.choices[0].model_extra["stop_reason"] == stop
        special = await sdk.chat.completions.create(
            messages=[{"role": "user", "content": "Say hi."}],
            extra_body={"skip_special_tokens": False, "ignore_eos": True},
            **{**GREEDY, "max_tokens": 30},
        )
        assert "<|im_end|>" in (special.choices[0].message.content or "")
        with pytest.raises(
            openai.BadRequestError, match="Unrecognized request argument supplied: guided_decoding_backend"
        ):
            await sdk.chat.completions.create(
                messages=CHAT, extra_body={"guided_decoding_backend": "xgrammar"}, **GREEDY
            )


async def test_routes_and_nulls_through_the_router(engines: list[ManagedProcess]) -> None:
    async with routed(engines, "data_parallel") as (sdk, url), httpx.AsyncClient(base_url=url) as http:
        card = await sdk.models.retrieve(MODEL)
        assert card.id == MODEL and card.model_extra["max_model_len"] == 1024  # type: ignore[index]
        listed = (await http.get("/v1/models")).json()["data"][0]
        assert listed["max_model_len"] == 1024
        assert (await http.get("/v1/models/nope")).status_code == 404
        assert (await http.get("/version")).json()["version"]
        tokens = (await http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT})).json()
        assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 1024
        text = (await http.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]})).json()
        assert text == {"prompt": PROMPT}
        chat_tokens = (await http.post("/tokenize", json={"model": MODEL, "messages": CHAT})).json()
        r = await sdk.chat.completions.create(messages=CHAT, **GREEDY)
        assert r.usage is not None and r.usage.prompt_tokens == chat_tokens["count"]
        # nulls where OpenAI allows them; null assistant content beside its tool calls
        tool_turns = [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C sunny"},
        ]
        body = {
            "model": MODEL,
            "messages": tool_turns,
            "max_tokens": 3,
            "stream": None,
            "n": None,
            "logprobs": None,
        }
        resp = await http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        resp = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": "x", "echo": None, "max_tokens": 2}
        )
        assert resp.status_code == 200, resp.text
        bad = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": "10"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
