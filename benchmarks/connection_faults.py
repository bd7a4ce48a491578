"""Issue 20's connection faults, measured on a router of this tree and of a peer tree (the code before the
fix) in one run, each over the same sim engine, with default settings: 200 slowloris connections, an idle
flood past a 1024-descriptor limit, a 64 MiB chunked body, and a router restarted under keep-alive load
(a second process started on the port, then SIGTERM to the first); and on engines of either tree
(`--parts engine`): an 8 MB and a 60 MB prompt while /health is probed, and 200 slowloris connections.

Usage: python benchmarks/connection_faults.py --peer /path/to/old/tree [--parts all|router|engine]
[--out docs/results/F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp

from microserve.machine import describe_machine
from microserve.processes import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
COMPLETION = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}


class Router:
    """A `microserve router` from one source tree (PYTHONPATH), optionally under a descriptor limit."""

    def __init__(self, tree: Path, port: int, engine: str, max_fds: int | None = None) -> None:
        cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "router", "--port", str(port),
               "--worker", engine]  # fmt: skip
        if max_fds is not None:
            cmd = ["sh", "-c", f'ulimit -n {max_fds} && exec "$@"', "sh", *cmd]
        self.log = tempfile.NamedTemporaryFile(prefix="router-", suffix=".log", delete=False)  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
        # cwd: `python -m` puts the working directory first on the path, before PYTHONPATH.
        self.proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def started(self, timeout: float = 60.0) -> bool:
        """Waits for its own start line; False if it exited first (it could not bind the port)."""
        deadline = time.monotonic() + timeout
        while f"router on {self.url}" not in Path(self.log.name).read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


@contextlib.contextmanager
def router(tree: Path, engine: str, max_fds: int | None = None) -> Iterator[Router]:
    r = Router(tree, free_port(), engine, max_fds)
    try:
        if not r.started():
            raise RuntimeError(f"router from {tree} did not start: {Path(r.log.name).read_text()[-2000:]}")
        yield r
    finally:
        r.stop()


@contextlib.asynccontextmanager
async def probing(url: str) -> AsyncIterator[list[int]]:
    """GET /health then a completion, each on a new connection with a 5 s limit, every 0.2 s."""
    statuses: list[int] = []
    stop = asyncio.Event()

    async def probe() -> None:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as s:
            while not stop.is_set():
                for call in (s.get(f"{url}/health"), s.post(f"{url}/v1/completions", json=COMPLETION)):
                    try:
                        async with call as resp:
                            await resp.read()
                            statuses.append(resp.status)
                    except (aiohttp.ClientError, TimeoutError):
                        statuses.append(0)
                await asyncio.sleep(0.2)

    task = asyncio.create_task(probe())
    try:
        yield statuses
    finally:
        stop.set()
        await task


async def slowloris(tree: Path, engine: str, seconds: float = 15.0) -> dict[str, object]:
    with router(tree, engine) as r:
        conns = [await asyncio.open_connection("127.0.0.1", r.port) for _ in range(200)]
        for _, w in conns:
            w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        readers = [rd for rd, _ in conns]
        drains = [asyncio.create_task(rd.read()) for rd in readers]
        async with probing(r.url) as statuses:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for _, w in conns:
                    if not w.is_closing():
                        with contextlib.suppress(ConnectionError):
                            w.write(b"a")  # a byte a second per connection
                await asyncio.sleep(1.0)
        still_open = sum(1 for d in drains if not d.done())
        for d in drains:
            d.cancel()
        for _, w in conns:
            w.close()
        return {"seconds": seconds, "still_open": still_open, "probes_ok": statuses.count(200),
                "probes": len(statuses)}  # fmt: skip


async def idle_flood(tree: Path, engine: str, seconds: float = 10.0) -> dict[str, object]:
    with router(tree, engine, max_fds=1024) as r:
        conns = []
        async with probing(r.url) as statuses:
            for source in ("127.0.0.2", "127.0.0.3"):
                for _ in range(1000):
                    conns.append(await asyncio.open_connection("127.0.0.1", r.port, local_addr=(source, 0)))
            await asyncio.sleep(seconds)
        for _, w in conns:
            w.close()
        return {"connections": len(conns), "descriptor_limit": 1024, "seconds": seconds,
                "probes_ok": statuses.count(200), "probes": len(statuses)}  # fmt: skip


async def chunked_body(tree: Path, engine: str) -> dict[str, object]:
    with router(tree, engine) as r:
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.post(f"{r.url}/v1/completions", json=COMPLETION) as resp:
                    await resp.read()
        before = r.rss_mib()
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b"x" * (1 << 20))
        sent = 0
        with contextlib.suppress(ConnectionError):
            for _ in range(66):
                writer.write(chunk)
                await writer.drain()
                sent += 1
        try:
            answer = await asyncio.wait_for(reader.read(), 30)
        except (ConnectionError, TimeoutError):
            answer = b""
        writer.close()
        await asyncio.sleep(3.0)
        status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "none"
        return {"status": status, "rss_before_mib": round(before), "rss_after_mib": round(r.rss_mib())}


async def restart(tree: Path, engine: str) -> dict[str, object]:
    """8 keep-alive clients; a second router on the port (if it can bind), SIGTERM to the first, and
    (if the second could not bind) the second started again once the first has exited. A failed
    attempt is retried after 50 ms: `failed` counts attempts, `failing_for_s` the first to the last."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    old = Router(tree, port, engine)
    new: Router | None = None
    results = {"ok": 0, "failed": 0}
    failed_at: list[float] = []
    stop = asyncio.Event()

    async def loop(session: aiohttp.ClientSession, k: int) -> None:
        while not stop.is_set():
            try:
                body = {**COMPLETION, "stream": k % 2 == 1}
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    await resp.read()
                    if resp.status == 200:
                        results["ok"] += 1
                        continue
            except (aiohttp.ClientError, TimeoutError):
                pass
            results["failed"] += 1
            failed_at.append(time.monotonic())
            await asyncio.sleep(0.05)  # try again shortly, as a client would

    try:
        if not old.started():
            raise RuntimeError("the first router did not start")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as session:
            loops = [asyncio.create_task(loop(session, k)) for k in range(8)]
            await asyncio.sleep(2.0)
            new = Router(tree, port, engine)
            second_bound = await asyncio.to_thread(new.started)
            old.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(old.proc.wait, 60)
            if not second_bound:
                new.stop()
                new = Router(tree, port, engine)
                await asyncio.to_thread(new.started)
            await asyncio.sleep(3.0)
            stop.set()
            await asyncio.gather(*loops)
        span = round(failed_at[-1] - failed_at[0], 1) if failed_at else 0.0
        return {"second_router_bound_while_first_ran": second_bound, **results, "failing_for_s": span}
    finally:
        old.stop()
        if new is not None:
            new.stop()


@contextlib.contextmanager
def engine_of(tree: Path, *flags: str) -> Iterator[ManagedProcess]:
    """A sim `microserve engine` from one source tree (PYTHONPATH and cwd)."""
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
           "--port", str(port), "--threads", "1", *flags]  # fmt: skip
    # cwd: `python -m` puts the working directory first on the path, before PYTHONPATH.
    cmd = ["sh", "-c", 'cd "$1" && shift && PYTHONPATH="$PWD" exec "$@"', "sh", str(tree), *cmd]
    process = ManagedProcess(cmd, f"http://127.0.0.1:{port}")
    try:
        wait_ready(process.url)
        yield process
    finally:
        process.stop()


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) / 1024


async def post_prompt(url: str, chars: int, limit_s: float) -> tuple[str, float]:
    """POST a prompt of `chars` characters (Content-Length); (status or "none", seconds to the answer)."""
    body = b'{"prompt":"' + b"x" * chars + b'","max_tokens":1}'
    host, port = url.removeprefix("http://").rsplit(":", 1)
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
    writer.write(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    answer = b""
    with contextlib.suppress(ConnectionError, TimeoutError):
        async with asyncio.timeout(limit_s):
            for i in range(0, len(body), 1 << 20):
                writer.write(body[i : i + (1 << 20)])
                await writer.drain()
            answer = await reader.read()
    writer.close()
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "none"
    return status, round(time.monotonic() - started, 2)


async def engine_huge_prompts(
    tree: Path, sizes_mb: tuple[int, ...] = (8, 60), limit_s: float = 20.0
) -> dict[str, object]:
    """The audit's 8 MB and 60 MB prompts (`sizes_mb`) sent to an engine while /health is probed every
    50 ms (each probe on a new connection, 5 s limit); the engine's memory before and 5 s after."""
    with engine_of(tree) as e:
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.post(f"{e.url}/v1/completions", json=COMPLETION) as resp:
                    await resp.read()
        before = rss_mib(e.proc.pid)
        probes: list[tuple[int, float]] = []
        stop = asyncio.Event()

        async def probe() -> None:
            connector = aiohttp.TCPConnector(force_close=True)
            timeout = aiohttp.ClientTimeout(total=5)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as ps:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        async with ps.get(f"{e.url}/health") as resp:
                            await resp.read()
                            probes.append((resp.status, time.monotonic() - started))
                    except (aiohttp.ClientError, TimeoutError):
                        probes.append((0, time.monotonic() - started))
                    await asyncio.sleep(0.05)

        task = asyncio.create_task(probe())
        answers = {f"{mb} MB": await post_prompt(e.url, mb * 1_000_000, limit_s) for mb in sizes_mb}
        stop.set()
        await task
        await asyncio.sleep(5.0)
        return {
            "answers (status, s)": answers,
            "answer_limit_s": limit_s,
            "health_ok": sum(1 for code, _ in probes if code == 200),
            "health_probes": len(probes),
            "health_slowest_ms": round(max((t for _, t in probes), default=0.0) * 1000),
            "rss_before_mib": round(before),
            "rss_after_mib": round(rss_mib(e.proc.pid)),
        }


async def engine_slowloris(tree: Path, seconds: float = 15.0) -> dict[str, object]:
    """200 connections to an engine trickling a header a byte a second (the engine's default limits)."""
    with engine_of(tree) as e:
        port = int(e.url.rsplit(":", 1)[1])
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
        for _, w in conns:
            w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        drains = [asyncio.create_task(rd.read()) for rd, _ in conns]
        async with probing(e.url) as statuses:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for _, w in conns:
                    if not w.is_closing():
                        with contextlib.suppress(ConnectionError):
                            w.write(b"a")
                await asyncio.sleep(1.0)
        still_open = sum(1 for d in drains if not d.done())
        for d in drains:
            d.cancel()
        for _, w in conns:
            w.close()
        return {"seconds": seconds, "still_open": still_open, "probes_ok": statuses.count(200),
                "probes": len(statuses)}  # fmt: skip


def wait_ready(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/ready", timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready")


async def measure(tree: Path, engine: str, parts: str, sizes_mb: tuple[int, ...]) -> dict[str, object]:
    results: dict[str, object] = {}
    if parts in ("all", "router"):
        results["slowloris"] = await slowloris(tree, engine)
        results["idle_flood"] = await idle_flood(tree, engine)
        results["chunked_64MiB"] = await chunked_body(tree, engine)
        results["restart"] = await restart(tree, engine)
    if parts in ("all", "engine"):
        results["engine_huge_prompts"] = await engine_huge_prompts(tree, sizes_mb)
        print(f"{tree}: engine_huge_prompts {results['engine_huge_prompts']}", file=sys.stderr, flush=True)
        results["engine_slowloris"] = await engine_slowloris(tree)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", required=True, type=Path, help="source tree of the code to compare with")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--parts", choices=["all", "router", "engine"], default="all", help="which scenarios (all)"
    )
    ap.add_argument(
        "--prompt-mb",
        default="8,60",
        help="prompt sizes sent to the engines (8,60; the code before the fix needs ~100 MB of memory "
        "a prompt MB and a second a MB to answer one)",
    )
    args = ap.parse_args()
    sizes_mb = tuple(int(x) for x in args.prompt_mb.split(","))
    port = free_port()
    engine = ManagedProcess(
        [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
         "--port", str(port), "--threads", "1"], f"http://127.0.0.1:{port}",
    )  # fmt: skip
    try:
        wait_ready(engine.url)
        results = {
            "this tree": asyncio.run(measure(ROOT, engine.url, args.parts, sizes_mb)),
            "peer": asyncio.run(measure(args.peer.resolve(), engine.url, args.parts, sizes_mb)),
        }
    finally:
        engine.stop()
    date = dt.date.today().isoformat()
    print(f"# connection faults — {date}, {describe_machine()}; peer: {args.peer}")
    for name, result in results.items():
        print(f"\n## {name}")
        for scenario, figures in result.items():
            print(f"{scenario}: {figures}")
    if args.out:
        document = {"date": date, "machine": describe_machine(), "peer": str(args.peer), "results": results}
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
