"""A lean HTTP/1.1 client for the router's hot path: pooled keep-alive connections, one asyncio protocol
each, responses parsed by `httptools` (llhttp, the parser in Node.js).

Why not aiohttp's client: measured on the 2-core benchmark machine, it spends most of a proxied request's
CPU time (a do-nothing proxy went from 6.2k to 14.8k requests/s at 64 connections by replacing it; see
docs/router-benchmark.md). This client does only what the router needs: one request at a time per
connection, Content-Length or chunked bodies in both directions, a deadline per request, streamed reads
with backpressure and read deadlines (a first byte by a time, then no read waiting longer than a stall
limit), and connections kept for reuse when the server allows.
"""

from __future__ import annotations

import asyncio
import errno
import math
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

# Reading pauses when this much of a response body waits for its reader.
HIGH_WATER = 1 << 20


class ClientError(ConnectionError):
    """The request failed on the network: the connection could not be made, or it broke."""


class ConnectFailed(ClientError):
    """No connection could be made: nothing listens there (refused), or the host cannot be reached."""


_PEER_DOWN = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}


class RequestTimeout(TimeoutError):
    """The request's deadline passed before its response was read to the end."""


class ReadStalled(TimeoutError):
    """A read deadline passed with nothing come (`HTTPClient.request`'s `first_byte_s` and `stall_s`):
    `first_byte` when nothing of the body had come yet."""

    def __init__(self, first_byte: bool) -> None:
        super().__init__("no first byte by its deadline" if first_byte else "the body stalled")
        self.first_byte = first_byte


# eq=False: a client interns one Origin per URL (`HTTPClient._origins`), so identity is its equality, and
# the idle-connection lookup of every request hashes in C instead of a generated `__hash__`.
@dataclass(frozen=True, slots=True, eq=False)
class Origin:
    scheme: str
    host: str
    port: int
    host_header: bytes
    prefix: str = ""  # the URL's path (e.g. an OpenAI server's base "/proxy"), put before each request's

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.netloc.encode(), parts.path.rstrip("/"))


class Response:
    """A response whose head has arrived; read its body whole (`read`) or as it comes (`read_chunk`,
    `iter_chunks`).

    `close()` when done: a fully read response hands its connection back to the pool, a partly read one
    closes the connection (the server sees the client leave).
    """

    __slots__ = ("_conn", "headers", "status")

    def __init__(self, conn: Connection, status: int, headers: dict[str, str]) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers  # names in lower case

    async def read(self) -> bytes:
        conn = self._conn  # not through iter_chunks: an async generator costs a whole answer ~1 µs more
        chunks = []
        while chunk := await conn.next_chunk():
            chunks.append(chunk)
        self.close()
        return b"".join(chunks)

    async def read_chunk(self) -> bytes:
        """The body that has come since the last read (waiting for some if none has); b"" at its end. A
        plain coroutine: a relay that reads a stream chunk by chunk drives no async generator for it."""
        chunk = await self._conn.next_chunk()
        if not chunk:
            self.close()
        return chunk

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk

    async def iter_lines(self) -> AsyncIterator[bytes]:
        """The body line by line, each with its b"\\n" (the last one may lack it)."""
        pending = b""
        async for chunk in self.iter_chunks():
            pending += chunk
            start = 0
            while (end := pending.find(b"\n", start)) >= 0:
                yield pending[start : end + 1]
                start = end + 1
            pending = pending[start:]
        if pending:
            yield pending

    def close(self) -> None:
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is not None:
            conn.finish()

    release = close


class Connection(asyncio.Protocol):
    """One keep-alive connection to an origin; carries one request at a time."""

    def __init__(self, pool: HTTPClient, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        # Made by the loop it runs in, once: `asyncio.get_running_loop()` costs a getpid system call.
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: dict[str, str] = {}
        self._header_name = b""
        self._head: asyncio.Future[Response] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._keep_alive = False
        self._error: BaseException | None = None
        self._paused = False
        self._deadline: asyncio.TimerHandle | None = None
        # Read deadlines: one timer for all the reads of a response, re-armed when it finds the deadline of
        # the read in progress moved on (a timer a read would cost a heap push and a cancel a chunk).
        self._stall_s: float | None = None  # None: no read deadlines
        self._first_by = math.inf  # the head and the body's first byte by then (loop time)
        self._body_seen = False
        self._read_by = math.inf  # the deadline of the wait in progress, if any
        self._read_timer: asyncio.TimerHandle | None = None
        self._read_timer_at = math.inf
        self.received = False  # any byte of the current response
        self.holds_slot = False  # one of the client's max_connections, until the response is done
        self.idle_since = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ClientError("the server switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(ClientError(f"malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self._complete:
            self._fail(ClientError(f"the server closed the connection{f': {exc}' if exc else ''}"))
        self._pool.forget(self)

    # -- httptools callbacks ------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if name:
            self._header_name = name
            self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        else:  # a value continued across reads
            key = self._header_name.decode("latin-1").lower()
            self._headers[key] += value.decode("latin-1")

    def on_headers_complete(self) -> None:
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(Response(self, self._parser.get_status_code(), self._headers))

    def on_body(self, body: bytes) -> None:
        self._body_seen = True
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it once the message ends
        self._complete = True
        self._clear_deadlines()
        self._wake()

    # -- the request --------------------------------------------------------------------------------

    def send(
        self,
        head: bytes,
        body: bytes,
        deadline: float | None,
        first_byte_s: float | None = None,
        stall_s: float | None = None,
    ) -> asyncio.Future[Response]:
        assert self.transport is not None
        loop = self._loop
        self._parser = httptools.HttpResponseParser(self)
        self._headers, self._chunks, self._buffered = {}, deque(), 0
        self._complete, self._keep_alive, self._error, self.received = False, False, None, False
        self._head = loop.create_future()
        if deadline is not None:
            self._deadline = loop.call_at(deadline, self._timed_out)
        self._body_seen = False
        if first_byte_s is None and stall_s is None:
            self._stall_s = None
        else:
            self._stall_s = math.inf if stall_s is None else stall_s
            first_by = math.inf if first_byte_s is None else loop.time() + first_byte_s
            self._first_by = self._read_by = first_by
            if first_by < self._read_timer_at:
                self._arm_read(first_by)  # the head's wait
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)
        return self._head

    async def next_chunk(self) -> bytes:
        """All of the body that has come and not been read, as one piece (waiting for some if none has);
        b'' at its end. One piece, not one a server write: a relay then writes on what came together in
        one system call, where a stream's chunks often come several to a read from the socket."""
        while True:
            if chunks := self._chunks:
                if len(chunks) == 1:
                    chunk = chunks.popleft()
                else:
                    chunk = b"".join(chunks)
                    chunks.clear()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= HIGH_WATER // 4 and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return chunk
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            stall_s = self._stall_s
            if stall_s is not None:  # this read must end by its deadline (inlined: it runs a chunk)
                by = self._read_by = self._loop.time() + stall_s if self._body_seen else self._first_by
                if by < self._read_timer_at:
                    self._arm_read(by)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def finish(self) -> None:
        """The response is done with: keep the connection if it was read whole, else close it."""
        self._clear_deadlines()
        reusable = (
            self._complete
            and self._error is None
            and self.transport is not None
            and not self.transport.is_closing()
            and self._keep_alive
        )
        if reusable:
            self._pool.put_back(self)
        else:
            self.abort()

    def abort(self) -> None:
        self._clear_deadlines()
        if not self._complete:  # a reader still waiting on this response learns it will not come
            self._fail(ClientError("the connection was closed"))
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        self._pool.forget(self)

    def _timed_out(self) -> None:
        self._deadline = None
        self._fail(RequestTimeout("the request timed out"))
        if self.transport is not None:
            self.transport.abort()

    def _arm_read(self, at: float) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer_at = at
        self._read_timer = self._loop.call_at(at, self._read_deadline)

    def _read_deadline(self) -> None:
        at, self._read_timer, self._read_timer_at = self._read_timer_at, None, math.inf
        head, waiter = self._head, self._waiter
        if (head is None or head.done()) and (waiter is None or waiter.done()):
            return  # between reads (the reader's own time does not count), or data just came
        if self._read_by > at:
            self._arm_read(self._read_by)  # the wait in progress began after the timer was set
            return
        self._fail(ReadStalled(first_byte=not self._body_seen))
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(exc)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _clear_deadlines(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer, self._read_timer_at = None, math.inf


class HTTPClient:
    """Keep-alive connections per origin, reused last-in first-out; idle ones close after a while.

    At most `max_connections` carry a request at once; a request beyond that waits for one to finish.
    A client serves one event loop at a time (its connections belong to it): the one it was first used
    in, until that loop closes.
    """

    def __init__(
        self,
        *,
        max_connections: int = 4096,
        keepalive_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.keepalive_s = keepalive_s
        self.max_connections = max_connections
        self._in_use = 0  # requests holding one of the max_connections slots
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._idle: dict[Origin, list[Connection]] = {}
        self._all: set[Connection] = set()
        self._origins: dict[str, Origin] = {}
        self._ssl = ssl_context
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def request(
        self,
        method: str,
        url: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        connect_timeout_s: float | None = None,
        first_byte_s: float | None = None,
        stall_s: float | None = None,
    ) -> Response:
        """Send `method path` to the server at `url` (scheme://host:port); returns once the response's
        head arrives. `timeout_s` bounds the whole exchange, body included.

        Read deadlines, for a server that may freeze: the head and the body's first byte must come within
        `first_byte_s` of the request being sent, and then no read may wait more than `stall_s` for more
        (the time the reader spends between reads does not count); the head's wait or the read raises
        `ReadStalled`.
        """
        origin = self._origins.get(url)
        if origin is None:
            origin = self._origins[url] = Origin.parse(url)
        head = _request_head(method, origin.prefix + path, origin, headers, len(body))
        loop = self._loop
        if loop is None or loop.is_closed():  # asked once a loop: it costs a getpid system call
            loop = self._loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        await self._acquire_slot(deadline)
        try:
            for fresh in (False, True):
                conn = None if fresh else self._take_idle(origin)
                if conn is None:
                    conn = await self._connect(origin, connect_timeout_s, deadline)
                    fresh = True
                try:
                    resp = await conn.send(head, body, deadline, first_byte_s, stall_s)
                except BaseException as exc:
                    conn.abort()  # failed, timed out or cancelled half-way: the connection is spent
                    # A kept connection the server closed as we reused it: nothing was processed, so
                    # the request goes once more on a new connection.
                    if not isinstance(exc, ClientError) or fresh or conn.received:
                        raise
                    continue
                conn.holds_slot = True  # from here the connection gives the slot back when it is done
                return resp
            raise AssertionError("unreachable")
        except BaseException:
            self._release_slot()
            raise

    async def fetch(
        self,
        method: str,
        url: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        connect_timeout_s: float | None = None,
    ) -> tuple[int, bytes]:
        """`request`, its body read whole: (status, body). `timeout_s` bounds it all."""
        resp = await self.request(
            method, url, path, body=body, headers=headers, timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
        )  # fmt: skip
        try:
            return resp.status, await resp.read()
        finally:
            resp.close()

    async def post_json(
        self,
        url: str,
        path: str,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        connect_timeout_s: float | None = None,
    ) -> tuple[int, bytes]:
        """POST `payload` as JSON; (status, body read whole)."""
        sent = {"Content-Type": "application/json", **(headers or {})}
        return await self.fetch(
            "POST", url, path, body=orjson.dumps(payload), headers=sent, timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
        )  # fmt: skip

    async def _acquire_slot(self, deadline: float | None) -> None:
        if self._in_use < self.max_connections and not self._slot_waiters:
            self._in_use += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter  # a finishing request hands its slot over: _in_use stays as it is
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed a slot just as we gave up: pass it on
            else:
                self._slot_waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise RequestTimeout("no connection to a worker came free in time") from None
            raise

    def _release_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_use -= 1

    def connection_done(self, conn: Connection) -> None:
        if conn.holds_slot:
            conn.holds_slot = False
            self._release_slot()

    async def _connect(self, origin: Origin, timeout_s: float | None, deadline: float | None) -> Connection:
        if self._closed:
            raise ClientError("the client is closed")
        loop = asyncio.get_running_loop()
        if deadline is not None:
            left = deadline - loop.time()
            timeout_s = left if timeout_s is None else min(timeout_s, left)
        ssl_arg: ssl.SSLContext | None = None
        if origin.scheme == "https":
            ssl_arg = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(
                    lambda: Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=ssl_arg,
                    server_hostname=origin.host if ssl_arg else None,
                )
        except TimeoutError:
            raise RequestTimeout(f"connecting to {origin.host}:{origin.port} timed out") from None
        except OSError as exc:
            # Only the peer's side: this process out of descriptors or ports says nothing about it.
            kind = ConnectFailed if exc.errno in _PEER_DOWN else ClientError
            raise kind(f"cannot connect to {origin.host}:{origin.port}: {exc}") from None
        self._all.add(conn)
        return conn

    def _take_idle(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest = time.monotonic() - self.keepalive_s
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing() and conn.idle_since > oldest:
                return conn
            conn.abort()
        return None

    def put_back(self, conn: Connection) -> None:
        self.connection_done(conn)
        if self._closed:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.origin, []).append(conn)

    def forget(self, conn: Connection) -> None:
        self.connection_done(conn)
        self._all.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()


def _request_head(
    method: str, path: str, origin: Origin, headers: Mapping[str, str] | None, length: int
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1\r\n".encode(), b"Host: ", origin.host_header, b"\r\n"]
    if headers:
        for name, value in headers.items():
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    if length or method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: %d\r\n" % length)
    lines.append(b"\r\n")
    return b"".join(lines)
