"""A lean HTTP/1.1 server for the router: one asyncio protocol per connection, requests parsed by
`httptools` (llhttp), handlers as plain coroutines over a small `Request`, answers whole or streamed.

Why not aiohttp's server: on the 2-core benchmark machine a forwarding proxy built on this server and
`microserve.http.client` served 21k requests/s at 64 connections, the same proxy on aiohttp's server
12.8k and on uvicorn 11.1k (docs/router-benchmark.md). It does what the router needs and no more:
keep-alive and pipelining (answered in order), Content-Length or chunked request bodies with a size cap,
`Expect: 100-continue`, chunked streamed answers with write backpressure, the handler cancelled when its
client goes away, an idle timeout, and a graceful stop that lets requests in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import httptools
import orjson

from microserve.server.errors import APIError, bad_request, internal_error

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
PIPELINE_DEPTH = 16  # requests read ahead of the one being answered before reading pauses

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class Request:
    """A request read whole: method, path, query, headers (names in lower case) and body."""

    __slots__ = ("_conn", "_query", "body", "headers", "keep_alive", "method", "path", "query_string")

    def __init__(
        self,
        conn: HTTPProtocol,
        method: str,
        path: str,
        query_string: str,
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        self._conn = conn
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.body = body
        self.keep_alive = True  # the client will send more on this connection
        self._query: dict[str, str] | None = None

    @property
    def query(self) -> dict[str, str]:
        if self._query is None:
            self._query = dict(parse_qsl(self.query_string))
        return self._query

    def json(self) -> Any:
        """The body as JSON; an empty or malformed body is a 400."""
        if not self.body:
            raise bad_request("The request body is empty; send a JSON object.")
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"The request body is not valid JSON: {exc}") from None

    async def stream(self, status: int = 200, headers: Mapping[str, str] | None = None) -> Stream:
        """Start a streamed answer (chunked); the handler writes to it and returns it."""
        return await self._conn.start_stream(status, headers or {})


class Response:
    """A whole answer."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        body: bytes = b"",
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = "application/json",
    ) -> None:
        self.body = body
        self.status = status
        self.headers = dict(headers or {})
        if content_type is not None:
            self.headers.setdefault("Content-Type", content_type)

    @classmethod
    def json(cls, data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        return cls(orjson.dumps(data), status=status, headers=headers)

    @classmethod
    def error(cls, exc: APIError) -> Response:
        return cls.json(exc.body(), status=exc.status, headers=exc.headers)


class Stream:
    """A streamed answer being written: `write` waits while the client reads slower than we write."""

    __slots__ = ("_chunked", "_conn", "ended")

    def __init__(self, conn: HTTPProtocol, chunked: bool) -> None:
        self._conn = conn
        self._chunked = chunked
        self.ended = False

    async def write(self, data: bytes) -> None:
        if not data:
            return
        conn = self._conn
        if conn.transport is None or conn.transport.is_closing():
            raise ConnectionResetError("the client went away")
        conn.transport.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)
        if conn.write_paused:
            await conn.drain()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            if self._chunked and self._conn.transport is not None:
                self._conn.transport.write(b"0\r\n\r\n")


Handler = Callable[[Request], Awaitable["Response | Stream"]]


class Routes:
    """Exact paths to handlers by method; unknown paths are 404, known ones with another method 405."""

    def __init__(self) -> None:
        self._by_path: dict[str, dict[str, Handler]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._by_path.setdefault(path, {})[method.upper()] = handler

    def resolve(self, method: str, path: str) -> Handler:
        methods = self._by_path.get(path)
        if methods is None:
            raise APIError(404, f"Not Found: {method} {path}")
        handler = methods.get(method)
        if handler is None:
            if method == "HEAD" and "GET" in methods:
                return methods["GET"]
            allow = ", ".join(sorted(methods))
            raise APIError(405, f"Method Not Allowed: {method} {path}", headers={"Allow": allow})
        return handler


class HTTPProtocol(asyncio.Protocol):
    """One client connection: parses requests, answers them one at a time, in order."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._refused: APIError | None = None  # answered instead of the request being read
        self._queue: deque[Request | APIError] = deque()
        self._task: asyncio.Task[None] | None = None
        self._keep_alive = True
        self._read_paused = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._stream: Stream | None = None
        self.busy = False  # a request is being answered

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return  # the connection closes once the refusal is written
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(APIError(400, "Protocol upgrades are not supported."))
        except httptools.HttpParserError as exc:
            if self._refused is None:
                self._refuse(APIError(400, f"Malformed HTTP request: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left: what it asked for is not wanted any more
        self._queue.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client went away"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        if self.write_paused:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    # -- httptools callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._idle is not None:  # a request is arriving: the connection is not idle
            self._idle.cancel()
            self._idle = None
        self._url, self._headers, self._header_bytes = b"", {}, 0
        self._body, self._body_size = [], 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(APIError(431, "The request line and headers are too large."))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(APIError(431, "The request line and headers are too large."))
            return
        key = name.decode("latin-1").lower()
        self._headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        limit = self.server.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            self._refuse(APIError(413, f"The request body exceeds {limit} bytes."))
            return
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.server.max_body_bytes:
            self._refuse(APIError(413, f"The request body exceeds {self.server.max_body_bytes} bytes."))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._refused is not None:
            return
        url = httptools.parse_url(self._url)
        path = url.path.decode("utf-8", "replace")
        query = url.query.decode("latin-1") if url.query else ""
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        request = Request(self, self._parser.get_method().decode(), path, query, self._headers, body)
        request.keep_alive = self._parser.should_keep_alive()
        self._queue.append(request)
        if len(self._queue) > PIPELINE_DEPTH and self.transport is not None and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()
        if self._task is None:
            self._start_next()

    # -- answering ----------------------------------------------------------------------------------

    def _refuse(self, error: APIError) -> None:
        """Stop reading; answer `error` after whatever is ahead of it, then close."""
        if self._refused is not None:
            return  # the parser may call back again before it stops; one refusal is answered
        self._refused = error
        self._queue.append(error)
        if self._task is None:
            self._start_next()

    def _start_next(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        item = self._queue.popleft()
        self._keep_alive = isinstance(item, Request) and item.keep_alive  # for the answer being written
        self.busy = True
        self._task = asyncio.get_running_loop().create_task(self._answer(item))
        self._task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task[None]) -> None:
        self._task = None
        self.busy = False
        if self.transport is None:
            pass  # the client left
        elif self._queue and self._keep_alive:
            self._start_next()
        elif not self._keep_alive or self.server.stopping:
            self.transport.close()
        else:
            if self._read_paused:
                self._read_paused = False
                self.transport.resume_reading()
            self._arm_idle()
        self.server.request_done()

    async def _answer(self, item: Request | APIError) -> None:
        self._stream = None
        head_only = False
        try:
            if isinstance(item, APIError):
                raise item
            head_only = item.method == "HEAD"
            answer = await self.server.routes.resolve(item.method, item.path)(item)
        except APIError as exc:
            answer = Response.error(exc)
        except (ConnectionResetError, asyncio.CancelledError):
            return
        except Exception:
            log.exception(
                "unhandled error on %s %s", getattr(item, "method", "?"), getattr(item, "path", "?")
            )
            if self._stream is not None:  # too late for an error answer: cut the stream instead
                self._close()
                return
            answer = Response.error(internal_error())
        if isinstance(answer, Stream):
            answer.end()
            if not answer._chunked:
                self._keep_alive = False
        elif self._stream is not None:
            log.error("a handler started a stream but returned a whole response; closing the connection")
            self._close()
        else:
            self._write_whole(answer, head_only)

    async def start_stream(self, status: int, headers: Mapping[str, str]) -> Stream:
        if self.transport is None:
            raise ConnectionResetError("the client went away")
        chunked = self._parser.get_http_version() != "1.0"
        head = [self._status_line(status)]
        for name, value in headers.items():
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(b"Transfer-Encoding: chunked\r\n" if chunked else b"Connection: close\r\n")
        head.append(b"\r\n")
        self.transport.write(b"".join(head))
        self._stream = Stream(self, chunked)
        return self._stream

    def _write_whole(self, response: Response, head_only: bool) -> None:
        if self.transport is None:
            return
        body = response.body
        head = [self._status_line(response.status)]
        for name, value in response.headers.items():
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(b"Content-Length: %d\r\n" % len(body))
        if not self._keep_alive or self.server.stopping:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        if not head_only:
            head.append(body)
        self.transport.write(b"".join(head))

    def _status_line(self, status: int) -> bytes:
        return b"HTTP/1.1 %d %s\r\nDate: %s\r\n" % (status, _REASONS.get(status, b"Unknown"), _date())

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self.server.keepalive_s, self._close)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def close_if_idle(self) -> None:
        if not self.busy and not self._queue:
            self._close()


class HTTPServer:
    """Serves `routes` on a port; `stop` lets the requests in flight finish, then closes."""

    def __init__(
        self,
        routes: Routes,
        *,
        max_body_bytes: int = 32 * 1024 * 1024,
        keepalive_s: float = 75.0,
        backlog: int = 2048,
    ) -> None:
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.keepalive_s = keepalive_s
        self.backlog = backlog
        self.connections: set[HTTPProtocol] = set()
        self.stopping = False
        self.host = ""
        self.port = 0
        self._server: asyncio.Server | None = None
        self._idle_waiter: asyncio.Future[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HTTPProtocol(self), host, port, backlog=self.backlog, reuse_port=reuse_port or None
        )
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]

    def busy(self) -> int:
        return sum(1 for c in self.connections if c.busy)

    def request_done(self) -> None:
        if self._idle_waiter is not None and not self._idle_waiter.done() and not self.busy():
            self._idle_waiter.set_result(None)

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting, let requests in flight finish (up to `drain_timeout_s`), close every connection."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        if self.busy():
            self._idle_waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._idle_waiter), drain_timeout_s)
            except TimeoutError:
                log.warning(
                    "%d requests still in flight after %.0f s; closing them", self.busy(), drain_timeout_s
                )
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort() if conn.busy else conn.transport.close()
        if self._server is not None:
            await self._server.wait_closed()


_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]
