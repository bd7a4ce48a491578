"""Issue 20's faults 5 and 6, measured on `microserve serve` (two sim engines, strategy pd, default
settings) from this tree and from a peer tree (the code before the fix) in one run: what a stranger can do
with the KV verbs, what a client sees once every engine died, and what a `kind=openai` upstream's 500
leaks; plus the pd request latency, to show what the peer challenge costs.

Usage: python benchmarks/secure_defaults.py --peer /path/to/old/tree [--out docs/results/F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from microserve.machine import describe_machine
from microserve.processes import free_port

MODEL = "smollm2-135m"
COMPLETION = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}
LEAKY = b'Traceback (most recent call last):\n  File "/srv/secret/app.py", line 3\ndb_password=hunter2\n'
SECRETS = ("hunter2", "/srv/secret", "Traceback", "127.0.0.1")


class Process:
    """A microserve command from one source tree (PYTHONPATH, cwd), its output in a file."""

    def __init__(self, tree: Path, args: list[str]) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="secure-", suffix=".log", delete=False)  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("MICROSERVE_")}
        env.update(PYTHONPATH=str(tree), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no {text!r}:\n{self.output()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        Path(self.log.name).unlink(missing_ok=True)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


def environ_token(pid: int) -> str | None:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    env = dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)
    return env.get("MICROSERVE_INTERNAL_TOKEN")


class Stranger:
    """A server that is no engine: it records what it receives and answers 200 to everything."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        auth = "Authorization" in request.headers
        self.requests.append({"path": request.path, "bytes": len(body), "authorization": auth})
        return web.json_response({"proof": "0" * 64})


async def site(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, token: str | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.post(url, json=body, headers=headers) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def kv_verbs(session: aiohttp.ClientSession, a: str, b: str, token: str | None) -> dict[str, Any]:
    """A stranger's remote_send to its own URL, without and with the token; five reservations of a whole
    context each from one client."""
    stranger = Stranger()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stranger.handle)
    runner, url = await site(app)
    out: dict[str, Any] = {}
    try:
        prompt = list(range(100, 164))
        status, body = await post(
            session, f"{b}/microserving/prep_recv", {"request_id": "s1", "prompt": prompt}, token
        )
        send = {"request_id": "s1", "prompt": prompt, "kv_addr_info": body["kv_addr_info"], "dst_url": url}
        out["remote_send_anonymous"] = (await post(session, f"{a}/microserving/remote_send", send))[0]
        out["remote_send_with_token"] = (await post(session, f"{a}/microserving/remote_send", send, token))[0]
        out["stranger_received"] = {
            "requests": len(stranger.requests),
            "kv_bytes": sum(r["bytes"] for r in stranger.requests if "/kv/" in r["path"]),
            "with_token": sum(r["authorization"] for r in stranger.requests),
        }
        await post(session, f"{b}/microserving/release", {"request_id": "s1"}, token)
    finally:
        await runner.cleanup()
    async with session.get(f"{b}/v1/models") as r:
        max_len = (await r.json())["data"][0]["max_model_len"]
    accepted = 0
    for i in range(5):
        prompt = [100 + (i * 7919 + j * 104729) % 30000 for j in range(max_len)]
        status, _ = await post(
            session, f"{b}/microserving/prep_recv", {"request_id": f"r{i}", "prompt": prompt}, token
        )
        accepted += status == 200
    async with session.get(f"{b}/load") as r:
        out["reservations_accepted_of_5"] = accepted
        out["kv_reserved_fraction"] = round((await r.json())["kv_usage"], 3)
    for i in range(5):
        await post(session, f"{b}/microserving/release", {"request_id": f"r{i}"}, token)
    return out


async def pd_latency_ms(session: aiohttp.ClientSession, url: str, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        async with session.post(f"{url}/v1/completions", json=COMPLETION) as r:
            await r.read()
            assert r.status == 200, r.status
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


async def every_engine_dead(session: aiohttp.ClientSession, url: str, engines: list[int]) -> dict[str, Any]:
    for pid in engines:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    async with session.post(f"{url}/v1/completions", json=COMPLETION) as r:
        text = await r.text()
        first = {
            "status": r.status,
            "retry_after": r.headers.get("Retry-After"),
            "address_in_body": "127.0.0.1" in text,
        }
    async with session.get(f"{url}/ready") as r:
        first["ready_after_it"] = r.status
    stale: float | None = None  # how long /ready kept saying 200 after the kill (None: it never changed)
    while time.monotonic() - killed < 15.0:  # serve restarts the engines meanwhile
        async with session.get(f"{url}/ready") as r:
            if r.status != 200:
                stale = round(time.monotonic() - killed, 2)
                break
        await asyncio.sleep(0.02)
    first["ready_stale_s"] = stale
    return first


async def upstream_500(tree: Path) -> dict[str, Any]:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake500", "object": "model"}]})

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, body=LEAKY, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", fail)
    runner, url = await site(app)
    port = free_port()
    router = Process(tree, ["router", "--port", str(port), "--worker", f"{url},kind=openai,model=fake500"])
    try:
        await asyncio.to_thread(router.wait_for, f"router on http://127.0.0.1:{port}")
        body = {"model": "fake500", "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as session:
            status, answer = await post(session, f"http://127.0.0.1:{port}/v1/chat/completions", body)
        text = json.dumps(answer)
        return {"status": status, "leaked": [s for s in SECRETS if s in text]}
    finally:
        router.stop()
        await runner.cleanup()


async def measure(tree: Path, requests: int) -> dict[str, Any]:
    port = free_port()
    serve = Process(tree, ["serve", "--backend", "sim", "--port", str(port), "--strategy", "pd"])
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(serve.wait_for, "press Ctrl-C")
        engine_urls = re.findall(r"http://127\.0\.0\.1:\d+", serve.output().split("engines:")[1])
        pids = children(serve.proc.pid)
        token = environ_token(pids[0])
        result: dict[str, Any] = {"engine_token_generated": token is not None}
        async with aiohttp.ClientSession() as session:
            result["pd_latency_p50_ms"] = await pd_latency_ms(session, url, requests)
            result.update(await kv_verbs(session, engine_urls[0], engine_urls[1], token))
            result["every_engine_dead"] = await every_engine_dead(session, url, pids)
    finally:
        serve.stop()
    result["openai_upstream_500"] = await upstream_500(tree)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", required=True, type=Path, help="source tree of the code to compare with")
    ap.add_argument("--requests", type=int, default=40, help="pd requests timed per tree")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    this = Path(__file__).resolve().parents[1]
    results = {
        "peer": asyncio.run(measure(args.peer.resolve(), args.requests)),
        "microserve": asyncio.run(measure(this, args.requests)),
    }
    ratio = results["microserve"]["pd_latency_p50_ms"] / results["peer"]["pd_latency_p50_ms"]
    date = dt.date.today().isoformat()
    print(f"# secure defaults — {date}, {describe_machine()}; peer: {args.peer}")
    print(json.dumps(results, indent=2))
    print(f"pd latency p50, this tree / peer: {ratio:.2f}x")
    if args.out:
        document = {
            "date": date,
            "machine": describe_machine(),
            "peer": str(args.peer),
            "pd_latency_ratio": round(ratio, 3),
            "results": results,
        }
        args.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
