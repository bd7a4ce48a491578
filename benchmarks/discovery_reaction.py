"""How fast the router follows membership in etcd, with real sim engines registering themselves: the time
from an engine being ready to the router sending it traffic, and from an engine leaving to the router
taking it out of its pool, for a graceful stop (the engine withdraws its record) against its peer, a
SIGKILL (the record goes when its lease expires), under a steady load whose failed requests are counted.

Usage: python benchmarks/discovery_reaction.py [--ttl 5] [--rounds 3] [--out docs/results/discovery.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from microserve.machine import describe_machine  # noqa: E402
from microserve.processes import ManagedProcess, free_port  # noqa: E402
from microserve.router.config import RouterConfig  # noqa: E402
from microserve.router.health import HealthConfig  # noqa: E402
from microserve.router.router import Router  # noqa: E402
from tests.etcd_server import EtcdServer  # noqa: E402
from tests.router_fakes import serving  # noqa: E402


def engine(registry: str, ttl: int) -> ManagedProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
           "--port", str(port), "--threads", "1",
           "--register", registry, "--register-ttl", str(ttl)]  # fmt: skip
    return ManagedProcess(cmd, f"http://127.0.0.1:{port}")


async def until(condition: Callable[[], bool], timeout: float = 120.0) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def load(url: str, stop: asyncio.Event, outcomes: list[int]) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            body = {"prompt": "Once upon a time", "max_tokens": 8}
            async with session.post(f"{url}/v1/completions", json=body) as r:
                await r.read()
                outcomes.append(r.status)


async def one_round(router: Router, registry: str, ttl: int, how: str) -> tuple[float, float]:
    """(ready -> first request routed to it, stop -> out of the router's pool) for one newcomer."""
    newcomer = engine(registry, ttl)
    try:
        await asyncio.to_thread(newcomer.wait_ready, 180)
        url = newcomer.url
        joined = await until(lambda: url in router.pool and router.pool.get(url).requests > 0)
        start = time.monotonic()
        newcomer.proc.send_signal(signal.SIGTERM if how == "graceful" else signal.SIGKILL)
        await until(lambda: url not in router.pool)
        return joined, time.monotonic() - start
    finally:
        await asyncio.to_thread(newcomer.stop)


async def measure(ttl: int, rounds: int) -> dict[str, object]:
    etcd = EtcdServer(Path(tempfile.mkdtemp(prefix="etcd-bench-")))
    etcd.start()
    registry = etcd.url()
    steady = engine(registry, ttl)
    joins: list[float] = []
    leaves: dict[str, list[float]] = {"graceful": [], "sigkill": []}
    outcomes: list[int] = []
    try:
        await asyncio.to_thread(steady.wait_ready, 180)
        router = Router(RouterConfig(discovery=[registry], health=HealthConfig(interval_s=2.0)))
        async with serving(router) as client:
            await until(lambda: any(w.available for w in router.pool))
            stop = asyncio.Event()
            clients = [asyncio.create_task(load(client.server.url, stop, outcomes)) for _ in range(4)]
            for _ in range(rounds):
                for how in ("graceful", "sigkill"):
                    joined, left = await one_round(router, registry, ttl, how)
                    joins.append(joined)
                    leaves[how].append(left)
            stop.set()
            await asyncio.gather(*clients)
    finally:
        steady.stop()
        etcd.close()
    graceful, killed = statistics.median(leaves["graceful"]), statistics.median(leaves["sigkill"])
    return {
        "ttl_s": ttl,
        "rounds": rounds,
        "join_to_traffic_s": joins,
        "leave_graceful_s": leaves["graceful"],
        "leave_sigkill_s": leaves["sigkill"],
        "graceful_vs_sigkill": graceful / killed,
        "requests": len(outcomes),
        "failed": sum(1 for s in outcomes if s != 200),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ttl", type=int, default=5, help="the engines' --register-ttl")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    result = asyncio.run(measure(args.ttl, args.rounds))
    date = dt.date.today().isoformat()
    print(f"# discovery reaction — {date}, {describe_machine()}; TTL {args.ttl} s, {args.rounds} rounds")
    med = statistics.median
    print(f"joined -> first request routed: median {med(result['join_to_traffic_s']):.3f} s")  # type: ignore[arg-type]
    print(f"left, graceful stop (withdrawn): median {med(result['leave_graceful_s']):.3f} s")  # type: ignore[arg-type]
    print(f"left, SIGKILL (lease expiry, the peer): median {med(result['leave_sigkill_s']):.3f} s")  # type: ignore[arg-type]
    print(f"graceful / SIGKILL: {result['graceful_vs_sigkill']:.3f}x")
    print(f"requests under load: {result['requests']}, failed: {result['failed']}")
    if args.out:
        document = {"date": date, "machine": describe_machine(), **result}
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
