"""Connections that attack a server as issue 20's audit did, for the engine's and the router's tests:
slowloris headers, and reading what the server sent before it closed a connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

DEADLINE_S = 60.0


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def closed_by_server(reader: asyncio.StreamReader) -> bytes | None:
    """What the server sent before closing, or None while the connection is still open."""
    try:
        data = await asyncio.wait_for(reader.read(65536), 0.01)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return b"<reset>"
    if not data:
        return b""
    try:
        return data + await asyncio.wait_for(reader.read(), 5)
    except (TimeoutError, ConnectionResetError):
        return data


class Slowloris:
    """Connections that each send a request's headers one byte at a time and never end them."""

    def __init__(self, connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
        self.connections = connections

    @classmethod
    async def open(cls, url: str, count: int) -> Slowloris:
        port = int(url.rsplit(":", 1)[1])
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
        for _, writer in connections:
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        return cls(connections)

    async def until_closed(self) -> dict[int, bytes]:
        """Trickle on until the server has closed every connection; what it sent on each."""
        answers: dict[int, bytes] = {}
        started = time.monotonic()
        while len(answers) < len(self.connections):
            left = len(self.connections) - len(answers)
            assert time.monotonic() - started < DEADLINE_S, f"{left} still open"
            for i, (reader, writer) in enumerate(self.connections):
                if i in answers:
                    continue
                answer = await closed_by_server(reader)
                if answer is None:
                    writer.write(b"a")  # one byte at a time: the header never completes
                else:
                    answers[i] = answer
            await asyncio.sleep(0.1)
        return answers

    def close(self) -> None:
        for _, writer in self.connections:
            writer.close()
