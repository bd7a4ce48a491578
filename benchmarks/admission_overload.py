"""Issue 20's fault 4 and 3, measured on a router of this tree and of a peer tree (the code before the
fix) in one run, over the same three sim engines, with default settings.

overload: open-loop Poisson arrivals at --rate (about 8x what three sim engines serve) for --duration
seconds of streamed completions; admitted requests' TTFT, how long each refusal took, its Retry-After.
freeze: a steady streaming load while one engine is SIGSTOPped for --freeze seconds; the longest wait a
client saw for a byte, and failed requests.

Usage: python benchmarks/admission_overload.py --peer /path/to/old/tree [--out docs/results/F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from microserve.machine import describe_machine
from microserve.processes import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"


@contextlib.contextmanager
def router(tree: Path, engines: list[str]) -> Iterator[str]:
    """A `microserve router` from one source tree (PYTHONPATH) with default settings; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "router", "--port", str(port)]
    for url in engines:
        cmd += ["--worker", url]
    log = tempfile.NamedTemporaryFile(prefix="router-", suffix=".log", delete=False)  # noqa: SIM115
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    # cwd: `python -m` puts the working directory first on the path, before PYTHONPATH.
    proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while f"router on {url}" not in Path(log.name).read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"router from {tree} did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(log.name)


def idle(engines: list[str], timeout: float = 300.0) -> None:
    """Wait until every engine has nothing running or waiting (the previous run's requests are gone)."""
    deadline = time.monotonic() + timeout
    for url in engines:
        while True:
            with urllib.request.urlopen(f"{url}/load", timeout=5) as r:
                load = json.loads(r.read())
            if load["running"] == 0 and load["waiting"] == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} still busy: {load}")
            time.sleep(0.5)


async def one(session: aiohttp.ClientSession, url: str, i: int, max_tokens: int) -> dict[str, object]:
    body = {"model": MODEL, "prompt": f"Request {i}: once upon a time", "max_tokens": max_tokens,
            "stream": True}  # fmt: skip
    start = time.monotonic()
    out: dict[str, object] = {"sent": start}
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            out["status"] = resp.status
            if resp.status != 200:
                text = await resp.text()
                out["answered_s"] = time.monotonic() - start
                out["why"] = (
                    "waited" if "waited" in text else "expected wait" if "would wait" in text else "full"
                )
                out["retry_after"] = resp.headers.get("Retry-After")
                return out
            last, longest, first = start, 0.0, None
            tail = b""
            async for data in resp.content.iter_any():
                now = time.monotonic()
                first = now - start if first is None else first
                longest, last = max(longest, now - last), now
                tail = (tail + data)[-64:]
            out.update(ttft_s=first, e2e_s=last - start, longest_gap_s=longest, done=b"[DONE]" in tail)
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.update(status=0, error=repr(exc), answered_s=time.monotonic() - start)
    return out


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p / 100 * len(values)))], 3)


async def overload(url: str, rate: float, duration: float, max_tokens: int) -> dict[str, object]:
    rng = random.Random(0)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as s:
        tasks = []
        start = time.monotonic()
        next_at = start
        i = 0
        while next_at < start + duration:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            tasks.append(asyncio.create_task(one(s, url, i, max_tokens)))
            i += 1
            next_at += rng.expovariate(rate)
        results = await asyncio.gather(*tasks)
    ok = [r for r in results if r.get("status") == 200]
    refused = [r for r in results if r.get("status") in (429, 503)]
    other = [r for r in results if r.get("status") not in (200, 429, 503)]
    ttft = [float(r["ttft_s"]) for r in ok if r.get("ttft_s") is not None]  # type: ignore[arg-type]
    refusal = [float(r["answered_s"]) for r in refused]  # type: ignore[arg-type]
    first_refusal = min((float(r["sent"]) - start for r in refused), default=None)  # type: ignore[arg-type]
    retry_after = sorted({str(r["retry_after"]) for r in refused}, key=lambda v: (len(v), v))
    why: dict[str, int] = {}
    for r in refused:
        why[str(r["why"])] = why.get(str(r["why"]), 0) + 1
    # When the slow refusals (over 0.5 s) were sent: counts per 5 s of the run.
    slow_windows: dict[int, int] = {}
    for r in refused:
        if float(r["answered_s"]) > 0.5:  # type: ignore[arg-type]
            window = int((float(r["sent"]) - start) // 5 * 5)  # type: ignore[arg-type]
            slow_windows[window] = slow_windows.get(window, 0) + 1
    return {
        "sent": len(results),
        "ok": len(ok),
        "refused": len(refused),
        "other": len(other),
        "broken_streams": sum(1 for r in ok if not r.get("done")),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "ttft_max_s": pct(ttft, 100),
        "refusal_p50_s": pct(refusal, 50),
        "refusal_p99_s": pct(refusal, 99),
        "refusal_max_s": pct(refusal, 100),
        "slow_refusals_by_5s": slow_windows,
        "refusals_by_reason": why,
        "router_worker_errors": await worker_errors(url),
        "first_refusal_at_s": None if first_refusal is None else round(first_refusal, 2),
        "retry_after_values": retry_after[:12],
        "ok_per_s": round(len(ok) / duration, 2),
    }


async def worker_errors(url: str) -> list[str]:
    """The router's failed attempts by worker and kind, and its retries (from /metrics)."""
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as resp:
        text = await resp.text()
    wanted = ("microserve_router_worker_errors_total", "microserve_router_retries_total")
    return [line for line in text.splitlines() if line.startswith(wanted)]


async def freeze(url: str, victim: ManagedProcess, hang_s: float, clients: int) -> dict[str, object]:
    """`clients` loops of 60-token streams; the victim engine SIGSTOPped for `hang_s` after 3 s."""
    stop = asyncio.Event()
    results: list[dict[str, object]] = []

    async def loop(session: aiohttp.ClientSession, k: int) -> None:
        i = 0
        while not stop.is_set():
            results.append(await one(session, url, k * 10_000 + i, 60))
            i += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
        loops = [asyncio.create_task(loop(s, k)) for k in range(clients)]
        await asyncio.sleep(3.0)
        os.kill(victim.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(hang_s)
        finally:
            os.kill(victim.proc.pid, signal.SIGCONT)
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*loops)
    ok = [r for r in results if r.get("status") == 200 and r.get("done")]
    gaps = [float(r["longest_gap_s"]) for r in ok]  # type: ignore[arg-type]
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "longest_gap_max_s": pct(gaps, 100),
        "longest_gap_p99_s": pct(gaps, 99),
        "waited_over_5s": sum(1 for g in gaps if g > 5.0),
        "mean_e2e_s": round(statistics.fmean(float(r["e2e_s"]) for r in ok), 3) if ok else None,  # type: ignore[arg-type]
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", required=True, type=Path, help="source tree of the code to compare with")
    ap.add_argument("--rate", type=float, default=150.0, help="open-loop requests per second (150)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals (30)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--freeze", type=float, default=20.0, help="seconds one engine is SIGSTOPped (20)")
    ap.add_argument("--clients", type=int, default=6, help="streaming clients during the freeze (6)")
    ap.add_argument("--only", choices=("overload", "freeze"), default=None)
    ap.add_argument("--only-this-tree", action="store_true", help="skip the peer (a quick look)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    engines = []
    for _ in range(3):
        port = free_port()
        cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
               "--port", str(port), "--threads", "1"]  # fmt: skip
        engines.append(ManagedProcess(cmd, f"http://127.0.0.1:{port}"))
    urls = [e.url for e in engines]
    trees = {"this tree": ROOT} if args.only_this_tree else {"this tree": ROOT, "peer": args.peer.resolve()}
    results: dict[str, dict[str, object]] = {name: {} for name in trees}
    try:
        for engine in engines:
            engine.wait_ready(timeout=300)
        for name, tree in trees.items():
            if args.only in (None, "overload"):
                idle(urls)
                with router(tree, urls) as url:
                    results[name]["overload"] = asyncio.run(
                        overload(url, args.rate, args.duration, args.max_tokens)
                    )
                print(name, "overload", results[name]["overload"], flush=True)
            if args.only in (None, "freeze"):
                idle(urls)
                with router(tree, urls) as url:
                    results[name]["freeze"] = asyncio.run(freeze(url, engines[0], args.freeze, args.clients))
                print(name, "freeze", results[name]["freeze"], flush=True)
    finally:
        for engine in engines:
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine.proc.pid, signal.SIGCONT)
            engine.stop()
    date = dt.date.today().isoformat()
    print(f"# admission and hung engines — {date}, {describe_machine()}; peer: {args.peer}")
    for name, result in results.items():
        print(f"\n## {name}")
        for scenario, figures in result.items():
            print(f"{scenario}: {figures}")
    if args.out:
        settings = {"rate": args.rate, "duration_s": args.duration, "max_tokens": args.max_tokens,
                    "freeze_s": args.freeze, "clients": args.clients}  # fmt: skip
        document = {"date": date, "machine": describe_machine(), "peer": str(args.peer), "settings": settings,
                    "results": results}  # fmt: skip
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
