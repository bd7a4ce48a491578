"""The bench client against a scripted streaming server: what it sends, what it times, how it fails."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from microserve.bench.sender import RequestRecord, Target, first_model, send
from microserve.bench.workloads import BenchRequest, Endpoint
from tests.bench_fakes import FakeServer, start


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeServer, str]]:
    server = FakeServer(token_delay=0.02)
    http = await start(server)
    try:
        yield server, str(http.make_url("")).rstrip("/")
    finally:
        await http.close()


async def one(url: str, model: str, request: BenchRequest, **target: object) -> RequestRecord:
    async with aiohttp.ClientSession() as session:
        return await send(session, Target(url, model, **target), RequestRecord(request))  # type: ignore[arg-type]


CHAT = BenchRequest(0, 4, messages=({"role": "user", "content": "hi"},))


async def test_chat_stream_is_timed_per_generated_chunk(fake: tuple[FakeServer, str]) -> None:
    server, url = fake
    r = await one(url, "ok", CHAT)
    assert r.success and r.error is None
    # The role-only opening and the finish-only closing carry no token: four chunks, not six.
    assert len(r.chunk_times) == 4 and r.text == "a0.0 a0.1 a0.2 a0.3 "
    assert (
        r.usage_reported and r.output_tokens == 4 and r.prompt_len == len(b'[{"role":"user","content":"hi"}]')
    )
    assert r.ttft >= 0.02 * 0.9
    assert len(r.itl) == 3 and all(gap >= 0.02 * 0.9 for gap in r.itl)
    assert r.latency == pytest.approx(r.ttft + sum(r.itl))
    body = server.bodies[0]
    assert body["max_tokens"] == 4 and body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True} and body["messages"] == list(CHAT.messages)


async def test_completions_with_token_ids_and_no_ignore_eos(fake: tuple[FakeServer, str]) -> None:
    server, url = fake
    request = BenchRequest(0, 3, prompt=[11, 12, 13], prompt_len=3)
    r = await one(url, "ok", request, endpoint=Endpoint.COMPLETIONS, ignore_eos=False)
    assert r.success and len(r.chunk_times) == 3 and r.output_tokens == 3
    assert server.bodies[0]["prompt"] == [11, 12, 13] and "ignore_eos" not in server.bodies[0]


async def test_without_usage_the_chunks_are_counted(fake: tuple[FakeServer, str]) -> None:
    _, url = fake
    r = await one(url, "nousage", CHAT)
    assert r.success and not r.usage_reported and r.output_tokens == 4


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("missing", "HTTP 404: The model `missing` does not exist."),
        ("midstream-error", "stream error: engine died"),
        ("cut", "stream ended without [DONE]"),
        ("empty", "no generated token arrived"),
        ("slow", "timeout after 0.3 s"),
        ("garbage", "malformed stream chunk: AttributeError: 'str' object has no attribute 'get'"),
    ],
)
async def test_failures_are_recorded_as_one_line(
    fake: tuple[FakeServer, str], model: str, error: str
) -> None:
    _, url = fake
    r = await one(url, model, CHAT, request_timeout_s=0.3)
    assert not r.success and r.error == error


async def test_connection_refused_is_a_failed_request() -> None:
    r = await one("http://127.0.0.1:1", "ok", CHAT)
    assert not r.success and r.error is not None and r.error.startswith("ClientConnectorError")


async def test_first_model_comes_from_the_server(fake: tuple[FakeServer, str]) -> None:
    _, url = fake
    async with aiohttp.ClientSession() as session:
        assert await first_model(session, url) == "ok"
        with pytest.raises(ValueError, match="cannot list models"):
            await first_model(session, "http://127.0.0.1:1")
