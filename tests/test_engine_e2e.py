"""A real engine process on loopback, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from microserve.processes import engine_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine_url():
    with engine_process(
        "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory", "256MiB"
    ) as url:
        yield url


@pytest.fixture
def client(engine_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{engine_url}/v1", api_key="unused", max_retries=0)


def _idle(engine_url: str, timeout: float = 10.0) -> dict:
    """Wait until the engine runs nothing and holds no blocks; returns /load."""
    deadline = time.monotonic() + timeout
    while True:
        load = httpx.get(f"{engine_url}/load").json()
        if (
            load["running"] == 0
            and load["waiting"] == 0
            and load["kv_blocks_free"] == load["kv_blocks_total"]
        ):
            return load
        assert time.monotonic() < deadline, f"engine not idle: {load}"
        time.sleep(0.05)


def test_models_lists_the_served_model(client: openai.OpenAI):
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]


def test_chat_completion(client: openai.OpenAI):
    r = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20,
        temperature=0,
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 20


def test_completion_with_stop_string_and_length(client: openai.OpenAI):
    r = client.completions.create(
        model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text.startswith(" 5, 6,") and " 7" not in r.choices[0].text
    r = client.completions.create(
        model="smollm2-135m",
        prompt="Once upon a time",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_streaming_chat_with_usage(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=24,
        temperature=0,
    )
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_seeded_sampling_is_reproducible(client: openai.OpenAI):
    def sample() -> str:
        return (
            client.completions.create(
                model="smollm2-135m",
                prompt="My favourite colour is",
                max_tokens=16,
                temperature=1.0,
                top_p=0.9,
                seed=1234,
            )
            .choices[0]
            .text
        )

    assert sample() == sample()


def test_prefix_cache_reports_cached_tokens(client: openai.OpenAI):
    messages = [
        {"role": "system", "content": "You are a careful assistant. " * 20},
        {"role": "user", "content": "Say hi."},
    ]
    client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=2, temperature=0)
    r = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 16


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", "not valid JSON"),
    ("/v1/chat/completions", {"model": "smollm2-135m", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "smollm2-135m", "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, "nope"),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "x", "temperature": 9}, "temperature"),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "x", "max_tokens": "lots"}, "max_tokens"),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": "hello " * 1100}, "context length"),
    ("/v1/completions", {"model": "smollm2-135m", "prompt": [1, 2, 99999999]}, "vocabulary"),
]


@pytest.mark.parametrize(("path", "body", "needle"), BAD_REQUESTS)
def test_bad_input_is_a_4xx_in_openai_shape_and_server_keeps_serving(engine_url, client, path, body, needle):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{engine_url}{path}", headers={"Content-Type": "application/json"}, **kwargs)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower(), err
    assert err["type"] == "invalid_request_error"
    ok = client.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=1)
    assert ok.choices[0].text is not None


def test_client_disconnect_mid_stream_frees_blocks(engine_url: str):
    async def go() -> None:
        async with httpx.AsyncClient(base_url=engine_url, timeout=30) as c:
            body = {
                "model": "smollm2-135m",
                "prompt": "Tell me a long story.",
                "max_tokens": 500,
                "ignore_eos": True,
                "stream": True,
            }
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # hang up after the first chunk

    asyncio.run(go())
    _idle(engine_url)


def test_concurrent_requests_all_complete_and_nothing_leaks(engine_url: str):
    async def go() -> list[dict]:
        async with httpx.AsyncClient(base_url=engine_url, timeout=120) as c:
            reqs = [
                c.post(
                    "/v1/completions",
                    json={
                        "model": "smollm2-135m",
                        "prompt": f"Item {i}:",
                        "max_tokens": 8,
                        "ignore_eos": True,
                        "temperature": 0,
                    },
                )
                for i in range(12)
            ]
            return [r.json() for r in await asyncio.gather(*reqs)]

    results = asyncio.run(go())
    assert all(r["usage"]["completion_tokens"] == 8 for r in results)
    _idle(engine_url)


def test_metrics_and_load(engine_url: str):
    text = httpx.get(f"{engine_url}/metrics").text
    for name in (
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds",
        "vllm:prefix_cache_hits_total",
    ):
        assert name in text
    load = httpx.get(f"{engine_url}/load").json()
    assert set(load) >= {
        "waiting",
        "running",
        "kv_usage",
        "kv_blocks_free",
        "kv_blocks_total",
        "block_size",
        "prefix_hit_rate",
    }
    assert httpx.get(f"{engine_url}/health").status_code == 200
