"""The router's lean HTTP client against real servers on loopback: an aiohttp app for well-behaved
exchanges, and raw asyncio servers for the misbehaving ones (a stale keep-alive, a cut body)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from microserve.http.client import ClientError, Connection, HTTPClient, ReadStalled, RequestTimeout

pytestmark = pytest.mark.asyncio


class Peers:
    """Counts the client connections a server saw."""

    def __init__(self) -> None:
        self.ports: set[int] = set()

    def see(self, request: web.Request) -> None:
        self.ports.add(request.transport.get_extra_info("peername")[1])


def make_app(peers: Peers, release: asyncio.Event) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        peers.see(request)
        body = await request.read()
        return web.json_response(
            {"path": request.path, "body": body.decode(), "auth": request.headers.get("Authorization")}
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        peers.see(request)
        resp = web.StreamResponse()
        await resp.prepare(request)  # chunked transfer encoding
        await resp.write(b"first;")
        await release.wait()
        await resp.write(b"second;")
        await resp.write_eof()
        return resp

    async def close(request: web.Request) -> web.Response:
        peers.see(request)
        return web.Response(text="bye", headers={"Connection": "close"})

    async def slow(request: web.Request) -> web.Response:
        peers.see(request)
        await asyncio.sleep(5)
        return web.Response(text="late")

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(64):
            await resp.write(bytes([i]) * 65536)
        await resp.write_eof()
        return resp

    app = web.Application()

    async def lines(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for piece in (b"data: 1\n\nda", b"ta: 2\n", b"\ndata: [DONE]\n\n", b"tail"):
            await resp.write(piece)
            await asyncio.sleep(0.01)  # each piece its own read
        await resp.write_eof()
        return resp

    async def drip(request: web.Request) -> web.StreamResponse:
        """`n` chunks, `gap` seconds apart; with `wait`, each after the client's `release` as well."""
        resp = web.StreamResponse()
        await resp.prepare(request)
        gap, wait = float(request.query["gap"]), "wait" in request.query
        for i in range(int(request.query["n"])):
            if wait:
                await release.wait()
                release.clear()
            await asyncio.sleep(gap)
            await resp.write(b"%d;" % i)
        await resp.write_eof()
        return resp

    async def headless(request: web.Request) -> web.StreamResponse:
        peers.see(request)
        resp = web.StreamResponse()
        await resp.prepare(request)  # the head, then nothing
        await asyncio.sleep(30)
        return resp

    async def typed(request: web.Request) -> web.Response:
        return web.json_response({"type": request.content_type, "got": await request.json()})

    app.router.add_post("/echo", echo)
    app.router.add_post("/base/echo", echo)
    app.router.add_get("/lines", lines)
    app.router.add_post("/typed", typed)
    app.router.add_get("/stream", stream)
    app.router.add_get("/close", close)
    app.router.add_get("/slow", slow)
    app.router.add_get("/big", big)
    app.router.add_get("/drip", drip)
    app.router.add_get("/headless", headless)
    return app


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Peers, asyncio.Event]]:
    peers, release = Peers(), asyncio.Event()
    async with TestServer(make_app(peers, release), host="127.0.0.1") as srv:
        yield f"http://127.0.0.1:{srv.port}", peers, release


@pytest.fixture
async def client() -> AsyncIterator[HTTPClient]:
    c = HTTPClient()
    yield c
    await c.close()


async def test_keeps_the_connection_for_the_next_request(server, client: HTTPClient) -> None:
    url, peers, _ = server
    for i in range(3):
        resp = await client.request(
            "POST", url, "/echo", body=b"hello %d" % i, headers={"Authorization": "Bearer t"}
        )
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("application/json")
        data = await resp.read()
        assert orjson.loads(data) == {"path": "/echo", "body": f"hello {i}", "auth": "Bearer t"}
    assert len(peers.ports) == 1


async def test_streams_a_chunked_body_as_it_arrives(server, client: HTTPClient) -> None:
    url, _, release = server
    resp = await client.request("GET", url, "/stream")
    chunks = resp.iter_chunks()
    assert await anext(chunks) == b"first;"  # before the server has written the rest
    release.set()
    assert b"".join([c async for c in chunks]) == b"second;"


async def test_connection_close_is_not_reused(server, client: HTTPClient) -> None:
    url, peers, _ = server
    for _ in range(2):
        resp = await client.request("GET", url, "/close")
        assert await resp.read() == b"bye"
    assert len(peers.ports) == 2


async def test_a_response_closed_half_read_closes_its_connection(server, client: HTTPClient) -> None:
    url, peers, _ = server
    resp = await client.request("GET", url, "/stream")
    assert await anext(resp.iter_chunks()) == b"first;"
    resp.close()
    resp = await client.request("POST", url, "/echo", body=b"x")
    assert resp.status == 200
    await resp.read()
    assert len(peers.ports) == 2  # the half-read connection was not handed to the next request


async def test_the_deadline_covers_the_whole_exchange(server, client: HTTPClient) -> None:
    url, _, _ = server
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(RequestTimeout):
        await client.request("GET", url, "/slow", timeout_s=0.3)
    assert loop.time() - start < 2
    resp = await client.request("POST", url, "/echo", body=b"after")
    assert resp.status == 200 and b"after" in await resp.read()


async def test_large_bodies_arrive_whole_through_backpressure(server, client: HTTPClient) -> None:
    url, _, _ = server
    resp = await client.request("GET", url, "/big")
    body = bytearray()
    async for chunk in resp.iter_chunks():
        body += chunk
        await asyncio.sleep(0)  # a slow reader
    assert len(body) == 64 * 65536
    assert all(body[i * 65536] == i and body[i * 65536 + 65535] == i for i in range(64))


async def test_connection_refused_is_a_client_error(client: HTTPClient) -> None:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    with pytest.raises(ClientError, match="cannot connect"):
        await client.request("GET", f"http://127.0.0.1:{port}", "/")


async def test_bad_urls_are_refused(client: HTTPClient) -> None:
    with pytest.raises(ValueError, match="not an http"):
        await client.request("GET", "ftp://example", "/")


# -- raw servers: the misbehaving ones -------------------------------------------------------------

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def raw_server(handle: Callable) -> tuple[asyncio.Server, str, list[int]]:
    """A server running `handle(reader, writer, n)` per connection; returns it, its URL, the counts."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        try:
            await handle(reader, writer, len(connections))
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    return srv, f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}", connections


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    return head


async def test_a_stale_kept_connection_is_retried_once_on_a_fresh_one(client: HTTPClient) -> None:
    async def handle(reader, writer, n):
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        if n == 1:
            # The second request on this connection meets a server that is closing it (an idle
            # timeout racing the reuse): it reads the request and closes without an answer.
            await read_request(reader)
            return
        await asyncio.sleep(0.1)

    srv, url, connections = await raw_server(handle)
    async with srv:
        assert await (await client.request("GET", url, "/a")).read() == b"ok"
        assert await (await client.request("GET", url, "/b")).read() == b"ok"
    assert len(connections) == 2


async def test_a_fresh_connection_that_fails_is_not_retried(client: HTTPClient) -> None:
    async def handle(reader, writer, n):
        await read_request(reader)  # and close without an answer

    srv, url, connections = await raw_server(handle)
    async with srv:
        with pytest.raises(ClientError, match="closed the connection"):
            await client.request("POST", url, "/x", body=b"{}")
    assert len(connections) == 1


async def test_chunks_that_came_together_are_read_as_one_piece(client: HTTPClient) -> None:
    sent = asyncio.Event()

    async def handle(reader, writer, n):
        await read_request(reader)
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + b"3\r\none\r\n3\r\ntwo\r\n")  # two chunks, one write
        await writer.drain()
        await sent.wait()
        writer.write(b"5\r\nthree\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    srv, url, _ = await raw_server(handle)
    async with srv:
        resp = await client.request("GET", url, "/")
        await asyncio.sleep(0.05)  # both chunks are in
        assert await resp.read_chunk() == b"onetwo"  # one piece for the relay to write on at once
        sent.set()
        assert await resp.read_chunk() == b"three"  # and the next as it comes, without waiting for more
        assert await resp.read_chunk() == b""


async def test_a_body_cut_short_is_a_client_error(client: HTTPClient) -> None:
    async def handle(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()

    srv, url, _ = await raw_server(handle)
    async with srv:
        resp = await client.request("GET", url, "/")
        with pytest.raises(ClientError):
            await resp.read()


async def test_a_malformed_response_is_a_client_error(client: HTTPClient) -> None:
    async def handle(reader, writer, n):
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    srv, url, _ = await raw_server(handle)
    async with srv:
        with pytest.raises(ClientError, match="malformed"):
            await client.request("GET", url, "/")


async def test_max_connections_makes_requests_wait_their_turn() -> None:
    open_now, most = 0, 0

    async def handle(reader, writer, n):
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        try:
            while True:
                try:
                    await read_request(reader)
                except asyncio.IncompleteReadError:
                    return
                await asyncio.sleep(0.05)
                writer.write(OK)
                await writer.drain()
        finally:
            open_now -= 1

    client = HTTPClient(max_connections=1)
    srv, url, connections = await raw_server(handle)
    try:
        async with srv:

            async def one() -> bytes:
                return await (await client.request("GET", url, "/")).read()

            assert await asyncio.gather(*(one() for _ in range(4))) == [b"ok"] * 4
    finally:
        await client.close()
    assert most == 1 and len(connections) == 1


async def test_failed_requests_give_their_connection_slot_back(server) -> None:
    url, _, _ = server
    client = HTTPClient(max_connections=1)
    try:
        for _ in range(3):
            with pytest.raises(RequestTimeout):
                await client.request("GET", url, "/slow", timeout_s=0.05)
        half = await client.request("GET", url, "/stream")
        half.close()  # a response dropped half-read gives its slot back too
        resp = await asyncio.wait_for(client.request("POST", url, "/echo", body=b"x"), 2)
        assert resp.status == 200
        await resp.read()
    finally:
        await client.close()


async def test_a_reader_waiting_on_a_closed_response_is_told(server, client: HTTPClient) -> None:
    url, _, _ = server
    resp = await client.request("GET", url, "/stream")
    chunks = resp.iter_chunks()
    assert await anext(chunks) == b"first;"
    waiting = asyncio.create_task(anext(chunks))  # the server holds the rest back
    await asyncio.sleep(0.05)
    resp.close()
    with pytest.raises(ClientError, match="closed"):
        await asyncio.wait_for(waiting, 2)


async def test_post_json_sends_json_and_reads_the_answer_whole(server, client: HTTPClient) -> None:
    url, _, _ = server
    for _ in range(2):
        status, body = await client.post_json(url, "/typed", {"a": [1, 2]}, headers={"X-Trace": "t"})
        assert status == 200
        assert orjson.loads(body) == {"type": "application/json", "got": {"a": [1, 2]}}
    status, body = await client.fetch("GET", url, "/nowhere")
    assert status == 404


async def test_a_url_with_a_path_prefixes_every_request(server, client: HTTPClient) -> None:
    url, _, _ = server
    status, body = await client.fetch("POST", url + "/base/", "/echo", body=b"x")
    assert status == 200
    assert orjson.loads(body)["path"] == "/base/echo"


async def test_iter_lines_splits_across_reads(server, client: HTTPClient) -> None:
    url, _, _ = server
    resp = await client.request("GET", url, "/lines")
    got = [line async for line in resp.iter_lines()]
    assert got == [b"data: 1\n", b"\n", b"data: 2\n", b"\n", b"data: [DONE]\n", b"\n", b"tail"]


async def test_fetch_timeout_is_a_request_timeout(server, client: HTTPClient) -> None:
    url, _, _ = server
    with pytest.raises(RequestTimeout):
        await client.fetch("GET", url, "/slow", timeout_s=0.2)


# -- read deadlines ---------------------------------------------------------------------------------


async def test_a_body_that_stops_coming_is_read_stalled(server, client: HTTPClient) -> None:
    url, peers, _ = server
    resp = await client.request("GET", url, "/stream", first_byte_s=10, stall_s=0.2)
    assert await resp.read_chunk() == b"first;"
    async with asyncio.timeout(5):  # the stall limit, not the 10 s first-byte deadline, ends the wait
        with pytest.raises(ReadStalled) as stalled:
            await resp.read_chunk()
    assert not stalled.value.first_byte
    resp.close()
    resp = await client.request("POST", url, "/echo", body=b"next")
    assert b"next" in await resp.read()
    assert len(peers.ports) == 2  # the stalled connection was dropped, not reused


async def test_no_head_by_the_first_byte_deadline_is_read_stalled(server, client: HTTPClient) -> None:
    url, _, _ = server
    async with asyncio.timeout(5):
        with pytest.raises(ReadStalled) as stalled:
            await client.request("GET", url, "/slow", first_byte_s=0.2, stall_s=10)
    assert stalled.value.first_byte
    resp = await client.request("POST", url, "/echo", body=b"after")  # the slot was given back
    assert b"after" in await resp.read()


async def test_a_head_and_then_no_body_misses_the_first_byte(server, client: HTTPClient) -> None:
    url, _, _ = server
    resp = await client.request("GET", url, "/headless", first_byte_s=0.3, stall_s=10)
    async with asyncio.timeout(5):
        with pytest.raises(ReadStalled) as stalled:
            await resp.read_chunk()
    assert stalled.value.first_byte
    resp.close()


async def test_a_flowing_body_is_never_stalled_and_sets_few_timers(
    server, client: HTTPClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _, _ = server
    armed = 0
    arm = Connection._arm_read

    def counting(self: Connection, at: float) -> None:
        nonlocal armed
        armed += 1
        arm(self, at)

    monkeypatch.setattr(Connection, "_arm_read", counting)
    # 50 chunks 20 ms apart: a second in all, past three stall limits, each read well within its own
    resp = await client.request("GET", url, "/drip?n=50&gap=0.02", first_byte_s=5, stall_s=0.3)
    chunks = [chunk async for chunk in resp.iter_chunks()]
    assert b"".join(chunks) == b"".join(b"%d;" % i for i in range(50))
    assert armed <= 10 < len(chunks)  # re-armed when it fired early, not once a read


async def test_the_readers_own_time_does_not_count(server, client: HTTPClient) -> None:
    url, _, release = server
    resp = await client.request("GET", url, "/drip?n=2&gap=0.05&wait", first_byte_s=0.3, stall_s=0.3)
    release.set()
    assert await resp.read_chunk() == b"0;"
    await asyncio.sleep(1.0)  # a slow client: both deadlines pass between two reads, no chunk asked for
    release.set()
    assert await resp.read_chunk() == b"1;"  # its own wait was 50 ms
    assert await resp.read_chunk() == b""


async def test_a_reader_cancelled_while_waiting_is_cancelled_not_stalled(server, client: HTTPClient) -> None:
    url, _, _ = server
    resp = await client.request("GET", url, "/stream", first_byte_s=5, stall_s=5)
    assert await resp.read_chunk() == b"first;"
    reading = asyncio.create_task(resp.read_chunk())
    await asyncio.sleep(0.05)
    reading.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await reading
    resp.close()


async def test_no_read_deadline_without_one_asked(server, client: HTTPClient) -> None:
    url, _, release = server
    resp = await client.request("GET", url, "/drip?n=1&gap=0.3&wait")
    release.set()
    assert await resp.read() == b"0;"  # 300 ms to the first byte, and no deadline to miss
    resp = await client.request("GET", url, "/drip?n=1&gap=0.3&wait", first_byte_s=0.1)
    release.set()
    with pytest.raises(ReadStalled):
        await resp.read()
