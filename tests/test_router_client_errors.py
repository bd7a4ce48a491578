"""What a client hears when workers fail: never an internal address or an upstream's raw 5xx body, always
a request id; 503 with Retry-After when no worker can be reached; /metrics behind its token when set."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from microserve.processes import free_port
from microserve.router.client_errors import no_answer, upstream_error
from microserve.router.config import RouterConfig
from microserve.router.router import Router
from microserve.router.upstream import UpstreamHTTPError, WorkerFailure, WorkerUnreachable
from microserve.router.workers import Worker, WorkerKind, WorkerSpec
from tests.router_fakes import fakes, serving

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
WORKER = Worker(WorkerSpec("http://10.9.8.7:8001", kind=WorkerKind.OPENAI))
LEAKY = (
    b'Traceback (most recent call last):\n  File "/srv/secret/app.py", line 12, in handler\n'
    b"    connect(db_password='hunter2')\nRuntimeError: db down at 10.9.8.7:5432\n"
)


def _http_error(status: int, body: bytes, headers: dict[str, str] | None = None) -> UpstreamHTTPError:
    return UpstreamHTTPError(WORKER, status, body, headers or {})


def test_an_upstream_5xx_body_is_replaced_by_a_clean_error_with_the_request_id() -> None:
    err = upstream_error(_http_error(500, LEAKY), "rid-1")
    assert err.status == 502 and err.type == "server_error" and err.code == "upstream_error"
    assert "rid-1" in err.message and err.headers["X-Request-Id"] == "rid-1"
    for secret in ("hunter2", "/srv/secret", "10.9.8.7", "Traceback"):
        assert secret not in err.message


def test_an_upstream_503_stays_503_with_retry_after_and_a_plain_code_only() -> None:
    overloaded = orjson.dumps({"error": {"message": "queue full at 10.9.8.7", "code": "overloaded"}})
    err = upstream_error(_http_error(503, overloaded, {"Retry-After": "4"}), "rid")
    assert err.status == 503 and err.headers["Retry-After"] == "4" and err.code == "overloaded"
    assert "10.9.8.7" not in err.message
    weird = orjson.dumps({"error": {"message": "x", "code": "db_password=hunter2"}})
    err = upstream_error(_http_error(503, weird), "rid")
    assert err.code == "upstream_error" and err.headers["Retry-After"] == "1"


def test_a_client_error_in_openai_shape_passes_and_one_in_another_shape_does_not() -> None:
    body = orjson.dumps(
        {"error": {"message": "max_tokens too large", "type": "invalid_request_error", "param": "max_tokens"}}
    )
    err = upstream_error(_http_error(400, body), "rid")
    assert (err.status, err.message, err.param) == (400, "max_tokens too large", "max_tokens")
    err = upstream_error(_http_error(404, b"<html>nginx at 10.9.8.7</html>"), "rid")
    assert err.status == 404 and "10.9.8.7" not in err.message and "rid" in err.message


def test_no_reachable_worker_is_503_with_retry_after_other_failures_502() -> None:
    err = no_answer(WorkerUnreachable(WORKER, "cannot connect to 10.9.8.7:8001"), "rid")
    assert err.status == 503 and err.headers["Retry-After"] and err.code == "no_worker_available"
    err = no_answer(WorkerFailure(WORKER, "the answer was cut off at 10.9.8.7"), "rid")
    assert err.status == 502 and err.code == "upstream_failed"
    for e in (err, no_answer(WorkerUnreachable(WORKER, "x"), "rid")):
        assert "10.9.8.7" not in e.message and "rid" in e.message


@asynccontextmanager
async def leaky_upstream() -> AsyncIterator[str]:
    """An OpenAI-compatible server whose completions fail with a traceback, as a broken app would."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, body=LEAKY, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", fail)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_a_kind_openai_upstreams_500_reaches_the_client_clean(caplog) -> None:
    async with leaky_upstream() as url:
        router = Router(RouterConfig(workers=[WorkerSpec(url, kind=WorkerKind.OPENAI, models=("fake",))]))
        async with serving(router) as client:
            resp = await client.post("/v1/chat/completions", json=CHAT)
            text = await resp.text()
    assert resp.status == 502
    error = orjson.loads(text)["error"]
    assert error["type"] == "server_error" and resp.headers["X-Request-Id"] in error["message"]
    for secret in ("hunter2", "/srv/secret", "Traceback", "127.0.0.1", url):
        assert secret not in text
    # The operator still finds it all in the log, under the same request id.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert resp.headers["X-Request-Id"] in logged and "hunter2" in logged


async def test_a_stream_cut_mid_way_ends_with_an_error_event_that_names_no_worker() -> None:
    async with fakes(1) as servers:
        servers[0].die_after = 2
        router = Router(RouterConfig(workers=[WorkerSpec(servers[0].url, kind=WorkerKind.OPENAI)]))
        async with serving(router) as client:
            resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            raw = (await resp.read()).decode()
    last = orjson.loads(raw.strip().split("\n\n")[-1].removeprefix("data: "))
    assert last["error"]["code"] == "worker_failed" and "request id" in last["error"]["message"]
    assert servers[0].url not in raw and "127.0.0.1" not in raw


async def test_when_no_worker_can_be_reached_ready_turns_503_at_once() -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    router = Router(
        RouterConfig(workers=[WorkerSpec(u, kind=WorkerKind.OPENAI, models=("fake",)) for u in dead])
    )
    async with serving(router) as client:
        for w in router.pool:
            w.healthy = True  # as if both had just died under traffic, before a health check noticed
        assert (await client.get("/ready")).status == 200
        resp = await client.post("/v1/chat/completions", json=CHAT)
        text = await resp.text()
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert orjson.loads(text)["error"]["code"] == "no_worker_available"
        assert all(u not in text for u in dead) and "127.0.0.1" not in text
        ready = await client.get("/ready")  # one failed request later, not after two health checks
        assert ready.status == 503 and (await ready.json())["workers_available"] == 0
        again = await client.post("/v1/chat/completions", json=CHAT)
        assert again.status == 503 and again.headers["Retry-After"] == "1"


async def test_metrics_and_scrape_targets_need_the_metrics_token_when_one_is_set() -> None:
    async with fakes(1) as servers:
        config = RouterConfig(
            workers=[WorkerSpec(servers[0].url, kind=WorkerKind.OPENAI)], metrics_token="m-tok"
        )
        async with serving(Router(config)) as client:
            for path in ("/metrics", "/prometheus/targets"):
                refused = await client.get(path)
                assert refused.status == 401 and servers[0].url not in await refused.text()
                wrong = await client.get(path, headers={"Authorization": "Bearer nope"})
                assert wrong.status == 401
                ok = await client.get(path, headers={"Authorization": "Bearer m-tok"})
                assert ok.status == 200
            assert (await client.get("/health")).status == 200  # the rest stays open


async def test_the_dashboard_state_needs_the_metrics_or_admin_token_when_one_is_set() -> None:
    async with fakes(1) as servers:
        workers = [WorkerSpec(servers[0].url, kind=WorkerKind.OPENAI)]
        config = RouterConfig(workers=workers, metrics_token="m-tok", admin_token="a-tok")
        async with serving(Router(config)) as client:
            refused = await client.get("/dashboard/state")
            assert refused.status == 401 and servers[0].url not in await refused.text()
            assert (await client.get("/dashboard/state", headers={"Authorization": "Bearer x"})).status == 401
            for token in ("m-tok", "a-tok"):
                ok = await client.get("/dashboard/state", headers={"Authorization": f"Bearer {token}"})
                assert ok.status == 200 and servers[0].url in await ok.text()
            assert (await client.get("/dashboard")).status == 200  # the page itself holds nothing
        async with serving(Router(RouterConfig(workers=workers))) as client:
            assert (await client.get("/dashboard/state")).status == 200  # no metrics token: open, as before
