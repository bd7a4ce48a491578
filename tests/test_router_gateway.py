"""The router over loopback in front of fake OpenAI-compatible workers: streaming pass-through, failures
mid-stream (error event for other servers, exact continuation for microserve workers), retries before the
first byte, overload, bad input, the admin API, circuit breaking, health checks and graceful shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from microserve.processes import free_port
from microserve.router.admission import AdmissionConfig
from microserve.router.app import RouterServer
from microserve.router.breaker import BreakerConfig
from microserve.router.config import RouterConfig
from microserve.router.health import HealthConfig
from microserve.router.router import Router
from microserve.router.workers import WorkerKind, WorkerSpec
from tests.router_fakes import CHAT_PROMPT, FakeOpenAI, RouterClient, expected_text, fakes, serving

DEADLINE_S = 5.0
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@asynccontextmanager
async def routing(
    servers: list[FakeOpenAI], kind: WorkerKind = WorkerKind.OPENAI, **settings: Any
) -> AsyncIterator[RouterClient]:
    workers = [WorkerSpec(s.url, kind=kind) for s in servers]
    router = Router(RouterConfig(workers=workers, **settings))
    async with serving(router) as client:
        yield client


def router_of(client: RouterClient) -> Router:
    return client.router


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """Every event of an SSE body: decoded JSON, or the string "[DONE]"."""
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "text/event-stream"
    raw = (await resp.read()).decode()
    assert raw.endswith("\n\n")
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return events


def chat_text(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content", "")
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )


# -------------------------------------------------------------------------------------- pass-through


async def test_answers_and_streams_pass_through_unchanged() -> None:
    async with fakes(2) as servers, routing(servers) as client:
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/json")
        assert (await resp.json())["choices"][0]["message"]["content"] == expected_text(3, 4)
        events = await sse(
            await client.post(
                "/v1/completions", json={"model": "fake", "prompt": "ab", "stream": True, "max_tokens": 3}
            )
        )
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected_text(2, 3)
        # round robin: one request each; the body reached the worker as the client sent it
        assert [len(s.generate_calls) for s in servers] == [1, 1]
        assert "return_token_ids" not in servers[1].generate_calls[0]
        models = await (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["fake"]


async def test_session_header_keeps_a_conversation_on_one_worker() -> None:
    async with fakes(3) as servers, routing(servers, policy="consistent_hash") as client:
        for _ in range(4):
            resp = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Session-ID": "s-42"})
            assert resp.status == 200
        assert sorted(len(s.generate_calls) for s in servers) == [0, 0, 4]


# ------------------------------------------------------------------------------ failures mid-stream


async def test_other_worker_dying_mid_stream_ends_with_error_event_and_no_done() -> None:
    async with fakes(2) as servers, routing(servers) as client:
        servers[0].die_after = 2
        events = await sse(await client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
        assert "[DONE]" not in events
        assert chat_text(events[:-1]) == expected_text(3, 2)
        error = events[-1]["error"]
        assert (error["type"], error["code"]) == ("server_error", "worker_failed")
        assert servers[1].generate_calls == []  # an OpenAI-compatible worker's stream is not continued
        # the router itself is fine
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200


@pytest.mark.parametrize("failure", ["die_after", "error_after"])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
async def test_microserve_stream_continues_on_another_worker_exactly(failure: str, route: str) -> None:
    async with fakes(2) as servers, routing(servers, kind=WorkerKind.MICROSERVE) as client:
        setattr(servers[0], failure, 3)
        chat = route.endswith("chat/completions")
        stream = {"max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
        body = {**CHAT, **stream} if chat else {"model": "fake", "prompt": "abcd", **stream}
        events = await sse(await client.post(route, json=body))
        assert events[-1] == "[DONE]"
        chunks, usage = events[:-2], events[-2]
        prompt_len = 3 if chat else 4
        text = chat_text(chunks) if chat else "".join(c["choices"][0]["text"] for c in chunks)
        assert text == expected_text(prompt_len, 8)  # as if nothing had happened
        assert {c["id"] for c in events[:-1]} == {"chatcmpl-fake" if chat else "cmpl-fake"}
        assert {c["object"] for c in events[:-1]} == {"chat.completion.chunk" if chat else "text_completion"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert usage["usage"]["completion_tokens"] == 8 and usage["usage"]["prompt_tokens"] == prompt_len
        raw = orjson.dumps(events[:-1])
        assert b"token_ids" not in raw  # the router asked for ids; the client did not get them
        # The continuation: prompt + the 3 ids streamed, 5 tokens to go, on the other worker.
        (cont,) = servers[1].generate_calls
        prompt = CHAT_PROMPT if chat else [ord(c) for c in "abcd"]
        assert cont["prompt"] == prompt + [1000 + prompt_len + i for i in range(3)]
        assert (cont["max_tokens"], cont["return_token_ids"]) == (5, True)
        assert servers[1].calls[0][0] == "/v1/completions"


async def test_continuation_keeps_ids_for_a_client_that_asked_for_them() -> None:
    async with fakes(2) as servers, routing(servers, kind=WorkerKind.MICROSERVE) as client:
        servers[0].die_after = 2
        body = {"model": "fake", "prompt": [5, 6], "max_tokens": 4, "stream": True, "return_token_ids": True}
        events = await sse(await client.post("/v1/completions", json=body))
        chunks = [e for e in events[:-1] if e["choices"]]
        assert chunks[0]["choices"][0]["prompt_token_ids"] == [5, 6]
        assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == [1002, 1003, 1004, 1005]


async def test_a_client_leaving_mid_stream_closes_the_upstream_and_leaks_nothing() -> None:
    async with fakes(1) as servers, routing(servers) as client:
        servers[0].delay = 0.02
        resp = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 200, "stream": True})
        await resp.content.readline()
        resp.close()  # the client hangs up
        await asyncio.wait_for(servers[0].aborted.wait(), DEADLINE_S)
        router = router_of(client)
        await wait_for(lambda: router.admission.running == 0, "the request to end")
        assert [w.in_flight for w in router.pool] == [0]
        metrics = (await (await client.get("/metrics")).read()).decode()
        assert 'microserve_router_requests_total{route="/v1/chat/completions",status="499"} 1.0' in metrics


PICK_TWICE = """
from microserve.router.strategies import Strategy

class PickTwice(Strategy):
    async def serve(self, req):
        self.pick("both", req)  # picked, never called: the router must still release it
        async for chunk in self.pick("both", req).generate(req):
            yield chunk
"""


async def test_workers_a_strategy_picked_but_never_called_are_released(tmp_path: Path) -> None:
    path = tmp_path / "twice.py"
    path.write_text(PICK_TWICE)
    async with fakes(2) as servers, routing(servers, strategy=f"{path}:PickTwice") as client:
        for body in (CHAT, {**CHAT, "stream": True}):
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status == 200 and (await resp.read()).strip()
        router = router_of(client)
        await wait_for(lambda: router.admission.running == 0, "the requests to end")
        assert [w.in_flight for w in router.pool] == [0, 0]


OVERRIDDEN = """
from microserve.router.strategies import DataParallel


class Counting(DataParallel):
    # Overrides `serve` only: whole answers must come from it too, not from DataParallel.serve_whole.
    served = 0

    async def serve(self, req):
        Counting.served += 1
        async for chunk in super().serve(req):
            yield chunk


class Silent(DataParallel):
    async def serve(self, req):
        self.pick("both", req)  # picked, never called
        return
        yield
"""


async def test_a_strategy_that_overrides_serve_answers_whole_requests_with_it(tmp_path: Path) -> None:
    path = tmp_path / "overridden.py"
    path.write_text(OVERRIDDEN)
    async with fakes(2) as servers, routing(servers, strategy=f"{path}:Counting") as client:
        for body in (CHAT, {**CHAT, "stream": True}):
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status == 200 and (await resp.read()).strip()
        assert type(router_of(client).strategy).served == 2  # type: ignore[attr-defined]
    async with fakes(2) as servers, routing(servers, strategy=f"{path}:Silent") as client:
        for body in (CHAT, {**CHAT, "stream": True}):  # an answer of nothing is an error, whole or not
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status == 502 and (await resp.json())["error"]["code"] == "empty_answer"
        router = router_of(client)
        await wait_for(lambda: router.admission.running == 0, "the requests to end")
        assert [w.in_flight for w in router.pool] == [0, 0]


VIA_COMPLETIONS = """
from microserve.router.continuation import StreamProgress, sampling_fields
from microserve.router.strategies import Strategy

PROMPT = [1, 2, 3]


class ViaCompletions(Strategy):
    # Answers chat through a completion-shaped endpoint on prompt ids, as PD does with start_generate.
    async def serve(self, req):
        worker = self.pick("decode", req)
        body = {**sampling_fields(req), "prompt": PROMPT, "max_tokens": req.max_tokens}
        if not req.stream:
            yield await worker.completion_whole(req, "/v1/completions", body)
            return
        progress = StreamProgress.for_request(req, prompt_ids=PROMPT)
        async for chunk in worker.completion_stream(req, "/v1/completions", body, progress):
            yield chunk
"""


@asynccontextmanager
async def via_completions(
    tmp_path: Path, workers: int
) -> AsyncIterator[tuple[list[FakeOpenAI], RouterClient]]:
    """`workers` fake microserve engines behind a router running the VIA_COMPLETIONS strategy."""
    path = tmp_path / "via.py"
    path.write_text(VIA_COMPLETIONS)
    async with (
        fakes(workers) as servers,
        routing(servers, kind=WorkerKind.MICROSERVE, strategy=f"{path}:ViaCompletions") as client,
    ):
        yield servers, client


async def test_strategy_building_blocks_shape_chat_and_continue_streams(tmp_path: Path) -> None:
    async with via_completions(tmp_path, 2) as (servers, client):
        sdk = openai.AsyncOpenAI(base_url=f"{client.server.url}/v1", api_key="x", max_retries=0)
        whole = await sdk.chat.completions.create(model="fake", messages=CHAT["messages"], max_tokens=4)
        assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
        assert whole.choices[0].message.content == expected_text(3, 4)
        assert servers[0].calls[0][0] == "/v1/completions"

        servers[1].die_after = 2  # round robin: the stream goes to the second worker, which dies
        stream = await sdk.chat.completions.create(
            model="fake", messages=CHAT["messages"], max_tokens=6, stream=True
        )
        chunks = [c async for c in stream]
        await sdk.close()
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text(3, 6)
        assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
        assert chunks[-1].choices[0].finish_reason == "length"
        assert servers[0].generate_calls[-1]["prompt"] == [1, 2, 3, 1003, 1004]  # the continuation


async def test_a_strategys_stream_ends_with_the_usage_the_client_asked_for(tmp_path: Path) -> None:
    async with via_completions(tmp_path, 1) as (servers, client):
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        events = await sse(await client.post("/v1/chat/completions", json=body))
        assert servers[0].generate_calls[0]["stream_options"] == {"include_usage": True}
        assert events[-1] == "[DONE]" and events[-2]["choices"] == []
        assert events[-2]["usage"]["prompt_tokens"] == 3 and events[-2]["usage"]["completion_tokens"] == 4
        whole = await client.post("/v1/chat/completions", json=CHAT)
        assert whole.status == 200 and "stream_options" not in servers[0].generate_calls[1]


# ------------------------------------------------------------------------------------------ retries


async def test_retry_before_the_first_byte_goes_to_another_worker() -> None:
    async with fakes(2) as servers, routing(servers) as client:
        servers[0].statuses = [503]  # round robin's first turn: w0 fails, the retry goes to w1
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 200
        servers[1].statuses = [502]  # the pool's second turn: w1 fails, the retry goes to w0
        events = await sse(await client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
        assert events[-1] == "[DONE]"
        assert [len(s.generate_calls) for s in servers] == [2, 2]
        metrics = (await (await client.get("/metrics")).read()).decode()
        assert "microserve_router_retries_total 2.0" in metrics


async def test_an_unreachable_worker_is_retried_elsewhere() -> None:
    async with fakes(1) as servers:
        dead = WorkerSpec(f"http://127.0.0.1:{free_port()}", kind=WorkerKind.OPENAI, models=("fake",))
        router = Router(RouterConfig(workers=[dead, WorkerSpec(servers[0].url, kind=WorkerKind.OPENAI)]))
        async with serving(router) as client:
            # It failed its first health check; put it back as if it had just died under traffic.
            router.pool.get(dead.url).healthy = True
            for _ in range(3):
                assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
            # The refused connection took it out at once: the next requests never went there.
            assert not router.pool.get(dead.url).healthy
        assert router.pool.get(dead.url).errors["connect"] == 1
        assert len(servers[0].generate_calls) == 3


async def test_client_errors_pass_through_without_retry() -> None:
    async with fakes(2) as servers, routing(servers) as client:
        resp = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 999})
        assert resp.status == 400
        assert (await resp.json())["error"]["message"] == "max_tokens too large"
        assert sum(len(s.generate_calls) for s in servers) == 1


async def test_when_every_attempt_fails_the_last_workers_error_is_returned() -> None:
    async with fakes(2) as servers, routing(servers) as client:
        for s in servers:
            s.statuses = [503, 503]
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 503 and resp.headers["Retry-After"] == "3"
        # A worker's 5xx body stays in the log: the client reads the status and a request id.
        message = (await resp.json())["error"]["message"]
        assert "scripted" not in message and resp.headers["X-Request-Id"] in message
        assert sum(len(s.generate_calls) for s in servers) == 3  # max_attempts


async def test_a_failing_worker_trips_its_circuit_breaker() -> None:
    async with (
        fakes(2) as servers,
        routing(servers, circuit_breaker=BreakerConfig(failure_threshold=2)) as client,
    ):
        servers[0].statuses = [500] * 10
        for _ in range(6):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
        assert len(servers[0].generate_calls) == 2  # then its circuit opened: no more traffic
        metrics = (await (await client.get("/metrics")).read()).decode()
        url = servers[0].url
        assert f'microserve_router_worker_circuit_state{{state="open",worker="{url}"}} 1.0' in metrics
        assert f'microserve_router_worker_circuit_state{{state="closed",worker="{url}"}} 0.0' in metrics


async def test_health_checks_take_a_dead_worker_out_and_ready_follows() -> None:
    health = HealthConfig(interval_s=0.05, timeout_s=0.5, unhealthy_after=1)
    async with fakes(2) as servers, routing(servers, health=health) as client:
        router = router_of(client)
        await servers[0].stop()
        await wait_for(lambda: not router.pool.get(servers[0].url).healthy, "the dead worker to be taken out")
        assert (await client.get("/ready")).status == 200
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
        await servers[1].stop()
        await wait_for(lambda: not router.pool.get(servers[1].url).healthy, "both workers to be out")
        assert (await client.get("/ready")).status == 503
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "no_worker_available"


# -------------------------------------------------------------------------------- overload and input


async def test_overload_answers_429_with_retry_after_and_recovers() -> None:
    admission = AdmissionConfig(max_concurrent=1, max_queued=0, retry_after_s=2)
    async with fakes(1) as servers, routing(servers, admission=admission) as client:
        servers[0].delay = 0.02
        slow = asyncio.create_task(
            client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20, "stream": True})
        )
        await asyncio.wait_for(servers[0].streaming.wait(), DEADLINE_S)
        refused = await client.post("/v1/chat/completions", json=CHAT)
        assert refused.status == 429 and refused.headers["Retry-After"] == "2"
        error = (await refused.json())["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert (await sse(await slow))[-1] == "[DONE]"
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
        metrics = (await (await client.get("/metrics")).read()).decode()
        assert 'microserve_router_requests_total{route="/v1/chat/completions",status="429"} 1.0' in metrics


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/chat/completions", b"[1]", 400),
        ("POST", "/v1/chat/completions", b"", 400),
        ("POST", "/v1/chat/completions", orjson.dumps({"messages": []}), 400),
        ("POST", "/v1/completions", orjson.dumps({"model": "fake"}), 400),
        ("POST", "/v1/chat/completions", orjson.dumps({**CHAT, "model": "gpt-9"}), 404),
        ("GET", "/v1/chat/completions", None, 405),
        ("POST", "/v1/nothing", b"{}", 404),
    ],
)
async def test_bad_input_is_a_4xx_in_openai_shape(
    method: str, path: str, body: bytes | None, status: int
) -> None:
    async with fakes(1) as servers, routing(servers) as client:
        resp = await client.request(method, path, data=body)
        assert resp.status == status
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        assert servers[0].generate_calls == []
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200


async def test_tokens_go_to_workers_and_the_clients_key_does_not() -> None:
    async with fakes(2) as servers:
        workers = [
            WorkerSpec(servers[0].url, kind=WorkerKind.MICROSERVE),
            WorkerSpec(servers[1].url, kind=WorkerKind.OPENAI, api_key="sk-upstream"),
        ]
        router = Router(RouterConfig(workers=workers, internal_token="internal-1"))
        async with serving(router) as client:
            for _ in range(2):
                resp = await client.post(
                    "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer mine"}
                )
                assert resp.status == 200
    assert servers[0].calls[0][2]["Authorization"] == "Bearer internal-1"
    assert servers[1].calls[0][2]["Authorization"] == "Bearer sk-upstream"


# -------------------------------------------------------------------------------------------- admin

USER_STRATEGY = '''
from microserve.router.strategies import Strategy

class LastWorker(Strategy):
    """Everything to the last worker picked twice: a strategy that reads like the built-in ones."""
    name = "last_worker"

    async def serve(self, req):
        first = self.pick("both", req)
        first.release()
        worker = self.pick("both", req)
        async for chunk in worker.generate(req):
            yield chunk
'''


async def test_admin_api_needs_its_token() -> None:
    async with fakes(1) as servers:
        async with routing(servers) as client:
            resp = await client.get("/admin/workers")
            assert resp.status == 403 and (await resp.json())["error"]["code"] == "admin_off"
        async with routing(servers, admin_token="s3cret") as client:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                resp = await client.put("/admin/policy", json={"name": "random"}, headers=headers)
                assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
                error = (await resp.json())["error"]
                assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
            assert router_of(client).policy.name == "round_robin"


async def test_admin_api_manages_workers_strategy_and_policy(tmp_path: Path) -> None:
    auth = {"Authorization": "Bearer s3cret"}
    async with fakes(3) as servers, routing(servers[:2], admin_token="s3cret") as client:

        async def admin(method: str, path: str, **kw: Any) -> tuple[int, Any]:
            resp = await client.request(method, path, headers=auth, **kw)
            return resp.status, await resp.json()

        status, body = await admin("GET", "/admin/workers")
        assert status == 200 and [w["url"] for w in body["workers"]] == [servers[0].url, servers[1].url]
        assert body["workers"][0]["models"] == ["fake"] and body["workers"][0]["circuit"] == "closed"

        status, body = await admin(
            "POST", "/admin/workers", json={"url": servers[2].url, "kind": "openai", "weight": 2}
        )
        assert status == 201 and body["worker"]["healthy"] and body["worker"]["weight"] == 2
        assert (await admin("POST", "/admin/workers", json={"url": servers[2].url}))[0] == 409
        assert (await admin("POST", "/admin/workers", json={"url": "ftp://x"}))[0] == 400

        status, body = await admin("POST", "/admin/workers/drain", json={"url": servers[0].url})
        assert status == 200 and body["worker"]["draining"]
        for _ in range(4):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
        assert [len(s.generate_calls) for s in servers] == [0, 2, 2]  # the drained one gets nothing new

        assert (await admin("DELETE", "/admin/workers", params={"url": servers[0].url}))[0] == 200
        assert (await admin("DELETE", "/admin/workers", params={"url": servers[0].url}))[0] == 404

        status, body = await admin(
            "PUT", "/admin/policy", json={"name": "weighted", "options": {"mode": "round_robin"}}
        )
        assert (status, body) == (200, {"name": "weighted", "options": {"mode": "round_robin"}})
        assert (await admin("PUT", "/admin/policy", json={"name": "fastest"}))[0] == 400
        # prefix_aware on token ids needs the model's tokenizer; "fake" has none
        status, body = await admin(
            "PUT", "/admin/policy", json={"name": "prefix_aware", "options": {"tokens": True}}
        )
        assert status == 400 and "tokenizer" in body["error"]["message"]
        assert (await admin("PUT", "/admin/policy", json={"name": "random", "options": {"x": 1}}))[0] == 400

        path = tmp_path / "mine.py"
        path.write_text(USER_STRATEGY)
        status, body = await admin("PUT", "/admin/strategy", json={"name": f"{path}:LastWorker"})
        assert (status, body["name"]) == (200, "last_worker")
        assert (await admin("GET", "/admin/strategy"))[1]["name"] == "last_worker"
        assert (await admin("PUT", "/admin/strategy", json={"name": f"{path}:Nope"}))[0] == 400
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
        # weighted 1:2, each request picks twice and keeps the second pick
        assert [len(s.generate_calls) for s in servers] == [0, 3, 4]


# ---------------------------------------------------------------------------------------- shutdown


async def test_shutdown_lets_streams_in_flight_finish() -> None:
    async with fakes(1) as servers:
        servers[0].delay = 0.02
        router = Router(RouterConfig(workers=[WorkerSpec(servers[0].url, kind=WorkerKind.OPENAI)]))
        server = RouterServer(router)
        await server.start()
        async with aiohttp.ClientSession() as session:
            url = f"{server.url}/v1/chat/completions"
            async with session.post(url, json={**CHAT, "max_tokens": 15, "stream": True}) as resp:
                await resp.content.readline()  # the stream has begun
                stopping = asyncio.create_task(server.stop(DEADLINE_S))
                rest = await resp.read()
            assert rest.endswith(b"data: [DONE]\n\n")
            await stopping
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.post(url, json=CHAT)
