"""The router's lean HTTP server on loopback: spoken to with raw sockets where the wire matters
(pipelining, Expect, HTTP/1.0, malformed input) and with aiohttp's client elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from microserve.http.limits import ConnectionLimits, ConnectionTable, descriptor_limit
from microserve.http.listener import listen, other_listeners
from microserve.http.server import HTTPServer, Request, Response, Routes, Stream
from microserve.serve import port_is_free
from microserve.server.errors import APIError


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
    server = HTTPServer(app.routes(), ConnectionLimits(max_body_bytes=1024, keepalive_s=5.0))
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
    server = HTTPServer(app.routes(), ConnectionLimits(keepalive_s=0.2))
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


# -- connection phases, caps and hand-over -----------------------------------------------------------


@contextlib.asynccontextmanager
async def limited(limits: ConnectionLimits, **start: Any) -> AsyncIterator[tuple[HTTPServer, App]]:
    app = App()
    server = HTTPServer(app.routes(), limits)
    await server.start(**start)
    try:
        yield server, app
    finally:
        await server.stop(1.0)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b"<reset>"


async def test_a_trickled_header_gets_408_and_a_silent_connection_is_closed() -> None:
    async with limited(ConnectionLimits(header_timeout_s=0.3)) as (server, _):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"GET /query HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        answer = b""
        for _ in range(100):  # a byte at a time, far slower than the deadline allows
            if reader.at_eof():
                break
            writer.write(b"a")
            with contextlib.suppress(TimeoutError):
                answer += await asyncio.wait_for(reader.read(65536), 0.05)
        answer += await read_until_closed(reader)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in answer
        writer.close()
        silent_reader, silent = await asyncio.open_connection(server.host, server.port)
        assert await read_until_closed(silent_reader) == b""  # nothing asked, nothing answered
        silent.close()
        assert server.timed_out == 1


async def test_a_trickled_body_gets_408_and_a_fast_one_is_served() -> None:
    async with limited(ConnectionLimits(body_timeout_s=0.3, body_min_rate=100)) as (server, _):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(100):
            if reader.at_eof():
                break
            writer.write(b"a")
            with contextlib.suppress(TimeoutError):
                if data := await asyncio.wait_for(reader.read(65536), 0.05):
                    assert data.startswith(b"HTTP/1.1 408 ")
                    break
        else:
            pytest.fail("the trickled body was never cut")
        writer.close()
        big = b"b" * 60_000  # 600 s at the minimum rate: it may take that long, and it takes far less
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\nConnection: close\r\n\r\n"
        data = await exchange(server, head + big)
        assert data.startswith(b"HTTP/1.1 200 ")


async def test_body_limits_are_per_route_and_the_client_reads_its_413() -> None:
    app = App()
    routes = app.routes()
    routes.add("POST", "/big", app.echo, max_body=200_000)
    server = HTTPServer(routes, ConnectionLimits(max_body_bytes=100))
    await server.start()
    try:
        async with aiohttp.ClientSession(base_url=server.url) as session:
            assert (await session.post("/echo", data=b"x" * 101)).status == 413
            assert (await session.post("/big", data=b"x" * 200_000)).status == 200

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(40):  # 2.6 MB, far past the limit; the server drops what follows it
                    yield b"y" * 65536

            resp = await session.post("/big", data=chunks())  # chunked: refused while it is read
            assert resp.status == 413
            assert "exceeds 200000 bytes" in (await resp.json())["error"]["message"]
    finally:
        await server.stop(1.0)


async def test_a_refused_body_is_freed_without_waiting_for_the_garbage_collector() -> None:
    async with limited(ConnectionLimits(max_body_bytes=1024)) as (server, _):
        gc.disable()  # what the router's tuned collector nearly amounts to
        try:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n")
            await wait_for(lambda: len(server.connections) == 1)
            conn = weakref.ref(next(iter(server.connections)))
            writer.write(b"x" * 2048)
            assert (await read_until_closed(reader)).startswith(b"HTTP/1.1 413 ")
            writer.close()
            await wait_for(lambda: not server.connections)
            assert conn() is None  # freed with the body it had read, not left for a collection
        finally:
            gc.enable()


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_client_over_its_cap_loses_its_oldest_idle_connection_not_others() -> None:
    limits = ConnectionLimits(max_connections=20, max_connections_per_client=5)
    async with limited(limits) as (server, _):
        flooder = ("127.0.0.2", 0)  # another client address on loopback
        flood = [
            await asyncio.open_connection(server.host, server.port, local_addr=flooder) for _ in range(12)
        ]
        await wait_for(lambda: server.table.count("127.0.0.2") == 5 and len(server.connections) == 5)
        for reader, _ in flood[:7]:  # the oldest made room for the newest, one each
            assert await read_until_closed(reader) == b""
        assert not any(reader.at_eof() for reader, _ in flood[7:])
        for source in (None, flooder):  # another client is served, and so is the flooding one
            reader, writer = await asyncio.open_connection(server.host, server.port, local_addr=source)
            writer.write(b"GET /query?a=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await read_until_closed(reader)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"a":"1"}')
            writer.close()
        for _, writer in flood:
            writer.close()


async def test_a_client_whose_connections_are_all_busy_gets_503_for_one_more() -> None:
    limits = ConnectionLimits(max_connections=20, max_connections_per_client=2)
    async with limited(limits) as (server, app):
        waiting = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
            waiting.append((reader, writer))
        await wait_for(lambda: server.busy() == 2)
        data = await exchange(server, b"GET /query HTTP/1.1\r\nHost: x\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in data
        app.release.set()
        for reader, writer in waiting:
            assert (await reader.readuntil(b"done")).startswith(b"HTTP/1.1 200 ")
            writer.close()
        assert server.refused_connections == 1


async def test_a_hand_over_steers_new_connections_and_answers_the_old_ones_before_closing() -> None:
    old_app, new_app = App(), App()
    old_routes, new_routes = old_app.routes(), new_app.routes()
    old_routes.add("GET", "/who", who("old"))
    new_routes.add("GET", "/who", who("new"))
    old = HTTPServer(old_routes)
    await old.start(reuse_port=True)
    new = HTTPServer(new_routes)
    kept_reader, kept = await asyncio.open_connection(old.host, old.port)  # kept alive on the old one
    kept.write(b"GET /who HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await kept_reader.readuntil(b"old")).startswith(b"HTTP/1.1 200 ")
    try:
        await new.start(old.host, old.port, reuse_port=True)
        async with aiohttp.ClientSession() as session:
            for _ in range(20):  # each on a connection of its own: all reach the newest listener
                resp = await session.get(f"{old.url}/who", headers={"Connection": "close"})
                assert await resp.text() == "new"
        stopping = asyncio.create_task(old.stop(10.0))
        await wait_for(lambda: not old._servers[0].is_serving())
        assert not stopping.done() and not kept_reader.at_eof()  # idle, yet left open: it may be in use
        kept.write(b"GET /who HTTP/1.1\r\nHost: x\r\n\r\n")  # sent before the client could know
        answer = await read_until_closed(kept_reader)
        assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in answer
        assert answer.endswith(b"old")
        await asyncio.wait_for(stopping, 10)
        kept.close()
    finally:
        await old.stop(1.0)
        await new.stop(1.0)


def who(name: str) -> Callable[[Request], Awaitable[Response]]:
    async def handler(request: Request) -> Response:
        return Response(name.encode(), content_type="text/plain")

    return handler


def test_the_connection_table_takes_the_longest_waiting_of_the_client_at_its_cap() -> None:
    table: ConnectionTable[str] = ConnectionTable(max_total=4, max_per_client=2)
    assert table.admit("a1", "A") == (True, None)
    assert table.admit("a2", "A") == (True, None)
    table.working("a1")  # reading a body: never taken
    assert table.admit("a3", "A") == (True, "a2")
    table.working("a3")
    assert table.admit("a4", "A") == (False, None)  # all of A's are working
    assert table.admit("b1", "B") == (True, None)
    assert table.admit("c1", "C") == (True, None)  # 4 in all now: a1, a3, b1, c1
    table.waiting("a1")  # a1 is idle again, so it waits from now: after b1 and c1
    assert table.admit("d1", "D") == (True, "b1")
    assert table.admit("d2", "D") == (True, "c1")
    assert (len(table), table.count("A"), table.count("B"), table.count("D")) == (4, 2, 0, 2)
    table.remove("a3")
    assert table.admit("e1", "E") == (True, None)


def test_connection_limits_resolve_their_caps_from_the_descriptor_limit() -> None:
    assert ConnectionLimits(max_connections=100).caps() == (100, 50)
    assert ConnectionLimits(max_connections=100, max_connections_per_client=500).caps() == (100, 100)
    total, per_client = ConnectionLimits().caps()
    assert total == descriptor_limit() * 3 // 4 and per_client == total // 2
    with pytest.raises(ValueError, match="timeouts"):
        ConnectionLimits(header_timeout_s=0)


def test_serve_counts_a_port_held_by_a_reuse_port_router_as_free_for_a_hand_over() -> None:
    [held] = listen("127.0.0.1", 0, backlog=8, reuse_port=True)
    port = held.getsockname()[1]
    try:
        assert port_is_free("127.0.0.1", port, reuse_port=True)
        assert not port_is_free("127.0.0.1", port)
        [successor] = listen("127.0.0.1", port, backlog=8, reuse_port=True)
        assert other_listeners(held) == 1 and other_listeners(successor) == 1
        successor.close()
        assert other_listeners(held) == 0
    finally:
        held.close()


async def _named(name: str, request: Request) -> Response:
    return Response.json({"route": name, "path": request.path})


def test_prefix_routes_take_the_paths_below_them_with_their_own_body_limit() -> None:
    routes = Routes()
    routes.add("POST", "/kv/*", functools.partial(_named, "prefix"), max_body=1000)
    routes.add("POST", "/kv/exact", functools.partial(_named, "exact"))
    assert routes.resolve("POST", "/kv/abc").args == ("prefix",)  # type: ignore[attr-defined]
    assert routes.resolve("POST", "/kv/exact").args == ("exact",)  # type: ignore[attr-defined]
    assert routes.max_body("POST", "/kv/abc/def", 10) == 1000
    assert routes.max_body("POST", "/kv/exact", 10) == 10
    assert routes.max_body("POST", "/other", 10) == 10
    with pytest.raises(APIError) as err:
        routes.resolve("POST", "/kv")
    assert err.value.status == 404
    with pytest.raises(APIError) as err:
        routes.resolve("GET", "/kv/abc")
    assert (err.value.status, err.value.headers) == (405, {"Allow": "POST"})


def test_connections_are_served_under_uvloop() -> None:
    # The engine and the router run on uvloop, whose transports do not subclass asyncio.Transport.
    import uvloop

    async def main() -> bytes:
        routes = Routes()
        routes.add("GET", "/x", functools.partial(_named, "x"))
        server = HTTPServer(routes)
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await server.stop(1)
        return answer

    answer = uvloop.run(main())
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"route":"x","path":"/x"}')
