"""A router process in front of a sim engine, attacked as issue 20's audit did: slowloris headers, a
trickled body, a flood of idle connections past the caps and the descriptor limit, an oversized chunked
body, and a router replaced on its port under keep-alive load. Each test asserts what the clients saw
(answers, closed connections) and what the router kept (memory), never how long it took."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from microserve.processes import ManagedProcess, free_port
from tests.fleet import MODEL, sim_engine, write_profile
from tests.slowloris import DEADLINE_S, Slowloris, closed_by_server, wait_for

pytestmark = pytest.mark.slow

COMPLETION = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    profile = write_profile(tmp_path_factory.mktemp("engine") / "profile.json", 0.005)
    process = sim_engine(profile)
    try:
        process.wait_ready(timeout=180)
        yield process.url
    finally:
        process.stop()


def start_router(
    engine: str, *flags: str, port: int | None = None, max_fds: int | None = None
) -> ManagedProcess:
    """A `microserve router` process, waited for by its own start line (another may share the port)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "router", "--port", str(port),
           "--worker", engine, "--health-interval", "0.5", *flags]  # fmt: skip
    if max_fds is not None:
        cmd = ["sh", "-c", f'ulimit -n {max_fds} && exec "$@"', "sh", *cmd]
    router = ManagedProcess(cmd, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + DEADLINE_S
    while f"router on http://127.0.0.1:{port}" not in router.output():
        if router.proc.poll() is not None or time.monotonic() > deadline:
            output = router.output()
            router.stop()
            raise RuntimeError(f"the router did not start:\n{output}")
        time.sleep(0.05)
    return router


@contextlib.asynccontextmanager
async def probing(url: str, source: str | None = None) -> AsyncIterator[list[int]]:
    """Health checks and completions, each on a new connection, one after another while the block runs:
    yields the statuses seen (a failure to connect or to read an answer is status 0)."""
    statuses: list[int] = []
    stop = asyncio.Event()

    async def probe() -> None:
        connector = aiohttp.TCPConnector(force_close=True, local_addr=(source, 0) if source else None)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as s:
            while not stop.is_set():
                for call in (s.get(f"{url}/health"), s.post(f"{url}/v1/completions", json=COMPLETION)):
                    try:
                        async with call as resp:
                            await resp.read()
                            statuses.append(resp.status)
                    except (aiohttp.ClientError, TimeoutError):
                        statuses.append(0)
                await asyncio.sleep(0.05)

    task = asyncio.create_task(probe())
    try:
        yield statuses
    finally:
        stop.set()
        await task


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError("no VmRSS")


async def test_slowloris_connections_are_closed_by_the_header_timeout_while_probes_succeed(
    engine: str,
) -> None:
    router = start_router(engine, "--header-timeout", "2")
    try:
        slow = await Slowloris.open(router.url, 200)
        started = time.monotonic()
        async with probing(router.url) as statuses:
            answers = await slow.until_closed()
            await wait_for(lambda: len(statuses) >= 10, "probes")
        print(f"\n200 slowloris connections closed in {time.monotonic() - started:.1f} s; probes: {statuses}")
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers.values())
        assert statuses and set(statuses) == {200}
        slow.close()
    finally:
        router.stop()


async def test_a_trickled_body_is_cut_by_the_body_timeout(engine: str) -> None:
    router = start_router(engine, "--body-timeout", "1", "--body-min-rate", "1KiB")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(router.url.rsplit(":", 1)[1]))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        writer.write(b"Content-Length: 10000\r\n\r\n{")
        async with probing(router.url) as statuses:
            started = time.monotonic()
            while (answer := await closed_by_server(reader)) is None:
                assert time.monotonic() - started < DEADLINE_S, "the trickled body was never cut"
                writer.write(b" ")
                await asyncio.sleep(0.1)
            await wait_for(lambda: len(statuses) >= 4, "probes")
        assert answer.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in answer
        assert set(statuses) == {200}
        writer.close()
    finally:
        router.stop()


async def test_idle_floods_past_the_caps_and_the_descriptor_limit_leave_the_router_answering(
    engine: str,
) -> None:
    # 256 descriptors: three quarters for clients (96 per address), the rest for the engine and files.
    router = start_router(engine, max_fds=256)
    port = int(router.url.rsplit(":", 1)[1])
    try:
        flood = []
        async with probing(router.url) as statuses, probing(router.url, "127.0.0.2") as flooder_statuses:
            for source in ("127.0.0.2", "127.0.0.3"):  # 800 connections that never send a byte
                for _ in range(400):
                    flood.append(await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)))
            await wait_for(lambda: len(statuses) >= 20 and len(flooder_statuses) >= 20, "probes")
            closed = [await closed_by_server(reader) for reader, _ in flood]
        assert set(statuses) == {200} and set(flooder_statuses) == {200}
        assert sum(answer is not None for answer in closed) >= len(flood) - 192
        for _, writer in flood:
            writer.close()
    finally:
        router.stop()


async def test_an_oversized_chunked_body_is_refused_with_413_and_its_memory_returned(engine: str) -> None:
    router = start_router(engine)
    port = int(router.url.rsplit(":", 1)[1])
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(5):  # warm up: what serving allocates once
                async with session.post(f"{router.url}/v1/completions", json=COMPLETION) as resp:
                    assert resp.status == 200
        before = rss_mib(router.proc.pid)
        for _ in range(3):  # 64 MiB each, chunked, where the limit is 4 MiB
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (1 << 20, b"x" * (1 << 20))
            with contextlib.suppress(ConnectionError):
                for _ in range(64):
                    writer.write(chunk)
                    await writer.drain()
            answer = await asyncio.wait_for(reader.read(), DEADLINE_S)
            assert answer.startswith(b"HTTP/1.1 413 ") and b"exceeds 4194304 bytes" in answer
            writer.close()
        after = rss_mib(router.proc.pid)
        print(f"\nrouter RSS {before:.0f} -> {after:.0f} MiB after three 64 MiB chunked bodies")
        assert after - before < 16
        async with aiohttp.ClientSession() as session:
            huge = {"Content-Length": str(100 << 20), "Content-Type": "application/json"}
            async with session.post(f"{router.url}/v1/completions", data=b"{}", headers=huge) as resp:
                assert resp.status == 413  # declared too large: refused before a byte of it is read
    finally:
        router.stop()


async def test_a_router_replaced_under_keep_alive_load_fails_no_request(engine: str) -> None:
    port = free_port()
    old = start_router(engine, port=port)
    new: ManagedProcess | None = None
    url = f"http://127.0.0.1:{port}"
    failures: list[str] = []
    served = 0
    stop = asyncio.Event()

    async def client_loop(session: aiohttp.ClientSession, k: int) -> None:
        nonlocal served
        while not stop.is_set():
            body = {**COMPLETION, "stream": k % 2 == 1}
            try:
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    text = await resp.text()
                    if resp.status != 200 or (body["stream"] and "[DONE]" not in text):
                        failures.append(f"{resp.status}: {text[:200]}")
                    else:
                        served += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(repr(exc))

    try:
        connector = aiohttp.TCPConnector(limit=8)  # kept-alive connections, reused request after request
        async with aiohttp.ClientSession(connector=connector) as session:
            loops = [asyncio.create_task(client_loop(session, k)) for k in range(8)]
            await wait_for(lambda: served >= 50, "load on the old router")
            new = start_router(engine, port=port)  # on the same port, while the old one serves
            before_stop = served
            await wait_for(lambda: served >= before_stop + 50, "load on both routers")
            old.proc.send_signal(signal.SIGTERM)
            await wait_for(lambda: old.proc.poll() is not None, "the old router to drain and exit")
            after_exit = served
            await wait_for(lambda: served >= after_exit + 50, "load on the new router alone")
            stop.set()
            await asyncio.gather(*loops)
        assert old.proc.returncode == 0
        assert not failures, failures[:5]
        print(f"\nhand-over: {served} requests, none failed")
    finally:
        old.stop()
        if new is not None:
            new.stop()
