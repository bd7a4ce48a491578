"""The router's lean HTTP server on loopback: spoken to with raw sockets where the wire matters
(pipelining, Expect, HTTP/1.0, malformed input) and with aiohttp's client elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from microserve.http.server import HTTPServer, Request, Response, Routes, Stream
from microserve.server.errors import APIError

pytestmark = pytest.mark.asyncio


class App:
    """Handlers that tell the tests what happened to them."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    def routes(self) -> Routes:
        routes = Routes()
        routes.add("POST", "/echo", self.echo)
        routes.add("GET", "/query", self.query)
        routes.add("GET", "/stream", self.stream)
        routes.add("GET", "/wait", self.wait)
        routes.add("GET", "/boom", self.boom)
        routes.add("GET", "/teapot", self.teapot)
        routes.add("DELETE", "/echo", self.echo)
        return routes

    async def echo(self, request: Request) -> Response:
        return Response.json({"method": request.method, "body": request.body.decode()})

    async def query(self, request: Request) -> Response:
        return Response.json(request.query)

    async def stream(self, request: Request) -> Stream:
        stream = await request.stream(headers={"Content-Type": "text/event-stream"})
        for i in range(3):
            await stream.write(b"data: %d\n\n" % i)
        return stream

    async def wait(self, request: Request) -> Response:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Response(b"done", content_type="text/plain")

    async def boom(self, request: Request) -> Response:
        raise RuntimeError("secret detail")

    async def teapot(self, request: Request) -> Response:
        raise APIError(418, "short and stout", code="teapot", headers={"X-Tea": "yes"})


@pytest.fixture
async def served() -> AsyncIterator[tuple[HTTPServer, App]]:
    app = App()
    server = HTTPServer(app.routes(), max_body_bytes=1024, keepalive_s=5.0)
    await server.start()
    yield server, app
    await server.stop(1.0)


async def exchange(server: HTTPServer, raw: bytes, *, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(raw)
    await writer.drain()
    try:
        if until_close:
            return await asyncio.wait_for(reader.read(), 5)
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def test_keep_alive_and_pipelined_requests_answer_in_order(served) -> None:
    server, _ = served
    one = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"
    two = b"DELETE /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\ntwo"
    last = b"GET /query?a=1&b=x%20y HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = await exchange(server, one + two + last)
    assert data.count(b"HTTP/1.1 200 OK") == 3
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in data.split(b"HTTP/1.1 ")[1:]]
    assert [orjson.loads(b) for b in bodies] == [
        {"method": "POST", "body": "one"},
        {"method": "DELETE", "body": "two"},
        {"a": "1", "b": "x y"},
    ]


async def test_a_chunked_request_body_and_expect_100_continue(served) -> None:
    server, _ = served
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    data = await exchange(server, raw)
    assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert data.endswith(b'{"method":"POST","body":"abcde"}')


async def test_bodies_over_the_limit_are_413_in_openai_shape(served) -> None:
    server, _ = served
    declared = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
    data = await exchange(server, declared)
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in data
    error = orjson.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
    assert "exceeds 1024 bytes" in error["message"]
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n" + b"x" * 2048
    assert (await exchange(server, chunked)).startswith(b"HTTP/1.1 413 ")


async def test_unknown_routes_methods_and_errors_in_openai_shape(served) -> None:
    server, _ = served
    async with aiohttp.ClientSession(base_url=server.url) as session:
        resp = await session.get("/nowhere")
        assert resp.status == 404
        assert (await resp.json())["error"]["message"] == "Not Found: GET /nowhere"
        resp = await session.put("/echo")
        assert resp.status == 405 and resp.headers["Allow"] == "DELETE, POST"
        resp = await session.get("/teapot")
        assert resp.status == 418 and resp.headers["X-Tea"] == "yes"
        assert (await resp.json())["error"]["code"] == "teapot"
        resp = await session.get("/boom")
        assert resp.status == 500
        assert "secret" not in await resp.text()  # the traceback goes to the log only
        resp = await session.post("/echo", data=b"still serving")
        assert (await resp.json())["body"] == "still serving"


async def test_malformed_requests_get_400_and_the_connection_closes(served) -> None:
    server, _ = served
    data = await exchange(server, b"NONSENSE\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 ") and b"Malformed HTTP request" in data
    huge = b"GET /query HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
    assert (await exchange(server, huge)).startswith(b"HTTP/1.1 431 ")
    many = b"GET /query HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(80))
    answer = await exchange(server, many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ") and answer.count(b"HTTP/1.1") == 1  # answered once


async def test_streams_are_chunked_and_plain_for_http_1_0(served) -> None:
    server, _ = served
    async with aiohttp.ClientSession(base_url=server.url) as session:
        resp = await session.get("/stream")
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert await resp.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    data = await exchange(server, b"GET /stream HTTP/1.0\r\n\r\n")
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"Connection: close" in head and b"chunked" not in head
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_head_answers_headers_only(served) -> None:
    server, _ = served
    data = await exchange(server, b"HEAD /query HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 2\r\n" in data
    assert data.endswith(b"\r\n\r\n")


async def test_a_client_that_leaves_cancels_its_handler(served) -> None:
    server, app = served
    _reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(app.started.wait(), 5)
    writer.close()
    await asyncio.wait_for(app.cancelled.wait(), 5)


async def test_stop_lets_requests_in_flight_finish_and_refuses_new_connections() -> None:
    app = App()
    server = HTTPServer(app.routes())
    await server.start()
    async with aiohttp.ClientSession() as session:
        idle = await session.post(f"{server.url}/echo", data=b"x")  # leaves a kept-alive connection
        await idle.read()
        waiting = asyncio.create_task(session.get(f"{server.url}/wait"))
        await asyncio.wait_for(app.started.wait(), 5)
        stopping = asyncio.create_task(server.stop(5.0))
        await asyncio.sleep(0.1)
        assert not stopping.done()
        app.release.set()
        resp = await waiting
        assert await resp.read() == b"done"
        assert resp.headers.get("Connection") == "close"
        await asyncio.wait_for(stopping, 5)
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{server.url}/query")
    assert not app.cancelled.is_set()


async def test_stop_cancels_what_outlives_the_drain_timeout() -> None:
    app = App()
    server = HTTPServer(app.routes())
    await server.start()
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(app.started.wait(), 5)
    await asyncio.wait_for(server.stop(0.2), 5)
    await asyncio.wait_for(app.cancelled.wait(), 5)
    assert await reader.read() == b""  # cut, not answered
    writer.close()


async def test_idle_connections_close_after_the_keepalive_timeout() -> None:
    app = App()
    server = HTTPServer(app.routes(), keepalive_s=0.2)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"GET /query HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"{}"), 5)
        assert first.startswith(b"HTTP/1.1 200 OK")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server when idle
        writer.close()
    finally:
        await server.stop(1.0)


async def test_stop_does_not_wait_for_a_client_that_left() -> None:
    app = App()
    server = HTTPServer(app.routes())
    await server.start()
    _reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(app.started.wait(), 5)
    stopping = asyncio.create_task(server.stop(30.0))
    await asyncio.sleep(0.05)
    writer.close()  # its handler is cancelled; nothing is left in flight
    await asyncio.wait_for(stopping, 5)
    assert app.cancelled.is_set()
