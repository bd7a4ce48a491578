"""A lean HTTP/1.1 server for the router: one asyncio protocol per connection, requests parsed by
`httptools` (llhttp), handlers as plain coroutines over a small `Request`, answers whole or streamed.

Why not aiohttp's server: on the 2-core benchmark machine a forwarding proxy built on this server and
`microserve.http.client` served 21k requests/s at 64 connections, the same proxy on aiohttp's server
12.8k and on uvicorn 11.1k (docs/router-benchmark.md). It does what the router needs and no more:
keep-alive and pipelining (answered in order), Content-Length or chunked request bodies under a limit
per route, `Expect: 100-continue`, chunked streamed answers with write backpressure, the handler
cancelled when its client goes away, a deadline on each phase of a connection and caps on connections
(`limits.py`), and a stop that hands the port over to a successor without losing a request (`stop`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl

import httptools
import orjson

from microserve.api.errors import APIError, bad_request, internal_error
from microserve.http.limits import ConnectionLimits, ConnectionTable
from microserve.http.listener import accept_queue_length, listen, other_listeners

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
PIPELINE_DEPTH = 16  # requests read ahead of the one being answered before reading pauses
HANDOVER_QUEUE_WAIT_S = 1.0  # at most, for a listener's accept queue to empty before it closes

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
)
_BUSY_BODY = orjson.dumps(
    APIError(503, "Too many connections are open; retry later.", code="too_many_connections").body()
)


class Reading(enum.Enum):
    """Where a connection is in reading its next request; each phase has its own deadline."""

    WAITING = 0  # for the request's first byte
    HEADERS = 1
    BODY = 2


# On Python 3.11 reading a member through its class (`Reading.BODY`) goes through the enum metaclass's
# attribute hook (it defines `__getattr__`): about 60 ns, five times a plain class attribute. Code that
# runs per request compares with these module constants.
_WAITING, _HEADERS, _BODY = Reading.WAITING, Reading.HEADERS, Reading.BODY


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

    @property
    def remote(self) -> str:
        """The client's address ("" where unknown)."""
        transport = self._conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return peer[0] if isinstance(peer, tuple) else ""

    def disconnected(self) -> bool:
        """The client has gone (the handler is cancelled too, but may poll between awaits)."""
        transport = self._conn.transport
        return transport is None or transport.is_closing()


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
    """A streamed answer being written: `write` waits while the client reads slower than we write.

    The status line and headers leave with the first write (or the end): one packet, not two, for
    each stream, as aiohttp does; measured on the engine's SSE answers (benchmarks/engine_http.py)."""

    __slots__ = ("_chunked", "_conn", "_head", "ended", "tap")

    def __init__(self, conn: HTTPProtocol, chunked: bool, head: bytes = b"") -> None:
        self._conn = conn
        self._chunked = chunked
        self._head = head
        self.ended = False
        self.tap: Callable[[bytes], None] | None = None  # sees each chunk written (token metering, caching)

    async def write(self, data: bytes) -> None:
        if not data:
            return
        if self.tap is not None:
            self.tap(data)
        conn = self._conn
        if conn.transport is None or conn.transport.is_closing():
            raise ConnectionResetError("the client went away")
        framed = b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data
        if self._head:
            framed, self._head = self._head + framed, b""
        conn.transport.write(framed)
        if conn.write_paused:
            await conn.drain()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            if self._conn.transport is not None and (self._head or self._chunked):
                self._conn.transport.write(self._head + (b"0\r\n\r\n" if self._chunked else b""))
                self._head = b""


Handler = Callable[[Request], Awaitable["Response | Stream"]]


class Routes:
    """Exact paths to handlers by method; unknown paths are 404, known ones with another method 405.
    A route (a prefix route too) may declare the largest body it takes; the others take the server's
    `max_body_bytes`."""

    def __init__(self) -> None:
        self._by_path: dict[str, dict[str, Handler]] = {}
        self._max_body: dict[tuple[str, str], int] = {}
        self._prefixes: list[tuple[str, dict[str, Handler]]] = []  # `/a/b/` answers `/a/b/<anything>`

    def add(self, method: str, path: str, handler: Handler, *, max_body: int | None = None) -> None:
        """`path` is exact, or a prefix when it ends with `/*` (the handler reads the rest of the path)."""
        if path.endswith("/*"):
            prefix = path[:-1]
            if max_body is not None:
                self._max_body[(method.upper(), prefix)] = max_body
            for known, methods in self._prefixes:
                if known == prefix:
                    methods[method.upper()] = handler
                    return
            self._prefixes.append((prefix, {method.upper(): handler}))
            return
        self._by_path.setdefault(path, {})[method.upper()] = handler
        if max_body is not None:
            self._max_body[(method.upper(), path)] = max_body

    def add_prefix(self, method: str, prefix: str, handler: Handler) -> None:
        """A handler for every path under `prefix` that has no exact route (it reads the rest itself)."""
        for known, methods in self._prefixes:
            if known == prefix:
                methods[method.upper()] = handler
                return
        self._prefixes.append((prefix, {method.upper(): handler}))

    def max_body(self, method: str, path: str, default: int) -> int:
        """The largest body `method path` takes: known before a byte of the body is read."""
        limit = self._max_body.get((method, path))
        if limit is None and path not in self._by_path:
            prefix = next((p for p, _ in self._prefixes if path.startswith(p)), None)
            limit = None if prefix is None else self._max_body.get((method, prefix))
        return default if limit is None else limit

    def resolve(self, method: str, path: str) -> Handler:
        methods = self._by_path.get(path)
        if methods is None:
            methods = next((m for prefix, m in self._prefixes if path.startswith(prefix)), None)
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
        self._loop = asyncio.get_running_loop()
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._url = b""
        self._method = ""
        self._path = ""
        self._query = ""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._body_limit = 0
        self._refused: APIError | None = None  # answered instead of the request being read
        self._queue: deque[Request | APIError] = deque()
        self._task: asyncio.Task[None] | None = None
        self._keep_alive = True
        self._read_paused = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._stream: Stream | None = None
        self.busy = False  # a request is being answered
        # Deadlines: one timer, which may fire early and then re-arms itself for the deadline then due.
        self._reading = _WAITING
        self._read_start = self._loop.time()  # of the phase being read
        self._requests = 0  # begun on this connection
        self._idle_since = 0.0
        self._linger_until: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's connections are transports; uvloop's do not subclass asyncio.Transport, so
        # no isinstance check here (it refused every connection under uvloop).
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        admitted, victim = self.server.table.admit(self, peer[0] if isinstance(peer, tuple) else "")
        if victim is not None:
            victim.close()  # idle or slow to send its headers: the newcomer gets its place
        if not admitted:  # every connection of this client (or of all) is reading a body or answered
            self.server.refused_connections += 1
            transport.write(_BUSY % (len(_BUSY_BODY), _BUSY_BODY))
            transport.close()
            return
        self.server.connections.add(self)
        self._read_start = self._loop.time()
        self._schedule()

    def data_received(self, data: bytes) -> None:
        if self._refused is not None or self._parser is None:
            return  # dropped: the connection closes once the refusal is written (and read)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(APIError(400, "Protocol upgrades are not supported."))
        except httptools.HttpParserError as exc:
            if self._refused is None:
                self._refuse(APIError(400, f"Malformed HTTP request: {exc}"))
        if self._reading is not _WAITING:
            # A request begun and not whole: its header or body deadline, which may come before the
            # idle connection's. Set here, once per read, not in the parser's callbacks: most requests
            # arrive whole in one read, and then none is needed.
            self._schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        # The parser holds this protocol and this protocol the parser: without breaking that cycle the
        # connection, and any body it buffered, would wait for the cyclic garbage collector.
        self._parser = None
        self._body = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left: what it asked for is not wanted any more
        self._queue.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client went away"))
        self.server.connection_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        if self.write_paused:
            self._drain = self._loop.create_future()
            await self._drain

    # -- httptools callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._requests:  # a new connection's first request has had its header deadline from the start
            self._read_start = self._loop.time()
        self._requests += 1
        self._reading = _HEADERS
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
        if self._refused is not None or self._parser is None:
            return
        url = httptools.parse_url(self._url)
        self._method = self._parser.get_method().decode()
        self._path = url.path.decode("utf-8", "replace")
        self._query = url.query.decode("latin-1") if url.query else ""
        self._reading, self._read_start = _BODY, self._loop.time()
        self.server.table.working(self)
        method = "GET" if self._method == "HEAD" else self._method
        self._body_limit = self.server.routes.max_body(method, self._path, self.server.limits.max_body_bytes)
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._body_limit:
            self._refuse(APIError(413, f"The request body exceeds {self._body_limit} bytes."))
            return
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._refused is not None:
            return
        self._body_size += len(body)
        if self._body_size > self._body_limit:
            self._body = []  # not held while the refusal is written and the rest of the body dropped
            self._refuse(APIError(413, f"The request body exceeds {self._body_limit} bytes."))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._refused is not None or self._parser is None:
            return
        self._reading = _WAITING
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._body = []
        request = Request(self, self._method, self._path, self._query, self._headers, body)
        request.keep_alive = self._parser.should_keep_alive()
        self._queue.append(request)
        if len(self._queue) > PIPELINE_DEPTH and self.transport is not None and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()
        if self._task is None:
            self._start_next()

    # -- deadlines ----------------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        """When the phase this connection is in has taken too long (None: no limit now)."""
        if self._linger_until is not None:
            return self._linger_until
        if self._refused is not None or self._read_paused:
            return None  # paused: the client waits for us, not we for it
        limits = self.server.limits
        if self._reading is _HEADERS:
            return self._read_start + limits.header_timeout_s
        if self._reading is _BODY:
            return self._read_start + limits.body_timeout_s + self._body_size / limits.body_min_rate
        if self.busy or self._queue:
            return None  # being answered: the request's own deadline is the handler's business
        if not self._requests:
            return self._read_start + limits.header_timeout_s  # a new connection owes its first request
        return self._idle_since + (0.0 if self.server.closing_idle else limits.keepalive_s)

    def _schedule(self) -> None:
        """Have the timer fire no later than the current deadline (earlier is fine: it re-checks)."""
        deadline = self._deadline()
        if deadline is None or self.transport is None:
            return
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline()
        if deadline is None or self.transport is None:
            return
        if deadline > self._loop.time():
            self._schedule()
        elif self._linger_until is not None or self._reading is _WAITING:
            self._close()  # lingered long enough, idle, or a new connection that sent nothing
        else:
            self.server.timed_out += 1
            self._refuse(APIError(408, "The request was not received in time; the connection closes."))

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
        item = self._queue.popleft()
        self.busy = True
        if isinstance(item, Request):
            self._keep_alive = item.keep_alive  # for the answer being written
        else:  # a refusal, perhaps before the headers were whole (which mark a connection working)
            self._keep_alive = False
            self.server.table.working(self)
        self._task = self._loop.create_task(self._answer(item))
        self._task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task[None]) -> None:
        self._task = None
        self.busy = False
        if self.transport is None:
            pass  # the client left
        elif self._queue and self._keep_alive:
            self._start_next()
        elif self._refused is not None:
            self._linger()
        elif not self._keep_alive:
            self.transport.close()
        else:
            if self._read_paused:
                self._read_paused = False
                self.transport.resume_reading()
            self._idle_since = self._loop.time()
            if self._reading is not _BODY:
                self.server.table.waiting(self)
            self._schedule()
        self.server.request_done()

    def _linger(self) -> None:
        """Close after a refusal without losing it: a client still sending its request would get a
        reset, and with it lose the answer, if the socket closed with its bytes unread; so half-close,
        drop what still arrives, and close when the client does or `linger_s` has passed."""
        transport = self.transport
        if transport is None:
            return
        if self.server.limits.linger_s <= 0 or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        self._linger_until = self._loop.time() + self.server.limits.linger_s
        self.server.table.waiting(self)
        self._schedule()

    async def _answer(self, item: Request | APIError) -> None:
        self._stream = None
        head_only = False
        try:
            if isinstance(item, APIError):  # not raised: its traceback would hold this connection
                answer: Response | Stream = Response.error(item)
            else:
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
        if self.transport is None or self._parser is None:
            raise ConnectionResetError("the client went away")
        chunked = self._parser.get_http_version() != "1.0"
        head = [self._status_line(status)]
        for name, value in headers.items():
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(b"Transfer-Encoding: chunked\r\n" if chunked else b"Connection: close\r\n")
        if chunked and self.server.stopping:
            head.append(b"Connection: close\r\n")
            self._keep_alive = False
        head.append(b"\r\n")
        self._stream = Stream(self, chunked, b"".join(head))
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
            self._keep_alive = False  # what is read after this answer is not answered
        head.append(b"\r\n")
        if not head_only:
            head.append(body)
        self.transport.write(b"".join(head))

    def _status_line(self, status: int) -> bytes:
        return b"HTTP/1.1 %d %s\r\nDate: %s\r\n" % (status, _REASONS.get(status, b"Unknown"), _date())

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        """Close now (to make room at a connection cap, or at the end of a stop)."""
        if self.transport is not None:
            self.transport.abort() if self.busy else self.transport.close()

    def is_idle(self) -> bool:
        return not self.busy and not self._queue and self._reading is _WAITING

    def drain_idle(self) -> None:
        """The server stops: close now if idle and the server closes idle connections, else let the
        deadline decide (a successor takes the port: wait for the client's next request)."""
        if self.is_idle() and self.server.closing_idle:
            self._close()
        else:
            self._schedule()


class HTTPServer:
    """Serves `routes` on a port; `stop` lets the requests in flight finish, then closes.

    Started with `reuse_port`, a second server (another process) can listen on the same port; new
    connections go to the newest (`listener.py`). Stopped while such a successor listens, this server
    takes in the connections already queued for it, closes its listener, answers every request that
    still arrives with `Connection: close`, and leaves idle connections open until their client sends
    one more request or their keep-alive timeout passes: closing an idle connection can race a request
    the client is sending on it, which would be lost. Without a successor, idle connections close at
    once: nobody else could answer what they might send."""

    def __init__(
        self, routes: Routes, limits: ConnectionLimits | None = None, *, backlog: int = 2048
    ) -> None:
        self.routes = routes
        self.limits = limits or ConnectionLimits()
        self.backlog = backlog
        self.connections: set[HTTPProtocol] = set()
        self.table: ConnectionTable[HTTPProtocol] = ConnectionTable(*self.limits.caps())
        self.stopping = False
        self.closing_idle = False
        self.timed_out = 0  # requests cut by a header or body deadline (408)
        self.refused_connections = 0  # new connections refused at a connection cap (503)
        self.host = ""
        self.port = 0
        self._servers: list[asyncio.Server] = []
        self._sockets: list[socket.socket] = []
        self._stop_waiter: asyncio.Future[None] | None = None
        self.tls: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.host}:{self.port}"

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """Listen on `host:port`; with `tls`, every connection speaks HTTPS (`microserve.http.tls`)."""
        loop = asyncio.get_running_loop()
        self.tls = tls
        self.table = ConnectionTable(*self.limits.caps())  # the descriptor limit in force now
        self._sockets = listen(host, port, backlog=self.backlog, reuse_port=reuse_port)
        try:
            for sock in self._sockets:
                server = await loop.create_server(
                    lambda: HTTPProtocol(self), sock=sock, backlog=self.backlog, ssl=tls
                )
                self._servers.append(server)
        except BaseException:
            for server in self._servers:
                server.close()
            for sock in self._sockets:
                sock.close()
            raise
        self.host, self.port = host, self._sockets[0].getsockname()[1]

    def busy(self) -> int:
        return sum(1 for c in self.connections if c.busy)

    def request_done(self) -> None:
        self._check_stopped()

    def connection_closed(self, conn: HTTPProtocol) -> None:
        self.connections.discard(conn)
        self.table.remove(conn)
        self._check_stopped()

    def _check_stopped(self) -> None:
        if self._stop_waiter is not None and not self._stop_waiter.done() and not self.connections:
            self._stop_waiter.set_result(None)

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting, let requests in flight finish (up to `drain_timeout_s`), close every connection.

        With a successor on the port (a hand-over), idle connections stay open within that time until
        their client's next request is answered (with `Connection: close`) or they reach their
        keep-alive timeout; set `drain_timeout_s` at least as long as the keep-alive timeout for a
        hand-over that never closes a connection a client may be using."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout_s
        self.stopping = True
        successor = any(other_listeners(sock) for sock in self._sockets if sock.fileno() >= 0)
        if successor:
            # New connections go to the successor; those queued here before it listened would be
            # reset when this listener closes (unless net.ipv4.tcp_migrate_req moves them): accept them.
            wait_until = min(deadline, loop.time() + HANDOVER_QUEUE_WAIT_S)
            while loop.time() < wait_until and any(accept_queue_length(s) for s in self._sockets):
                await asyncio.sleep(0.005)
        self.closing_idle = not successor
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.drain_idle()
        if self.connections:
            self._stop_waiter = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._stop_waiter), max(0.0, deadline - loop.time()))
            except TimeoutError:
                log.warning(
                    "%d connections still open (%d answering) after %.0f s; closing them",
                    len(self.connections),
                    self.busy(),
                    drain_timeout_s,
                )
        for conn in list(self.connections):
            conn.close()
        for server in self._servers:
            await server.wait_closed()


_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]
