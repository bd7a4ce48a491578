"""Router overhead against mock workers: direct, through microserve, sglang-router and vllm-router, the
same two workers, one run, round robin, at concurrency 1 and 64: requests/s and the p50/p99 latency each
router adds over calling a worker directly. The load comes from wrk (C), the lightest client there is.

Setup: benchmarks/setup_peers.sh. Usage: python benchmarks/router_overhead.py [--duration 10] [--out F]
[--stream TOKENS] (streamed answers of TOKENS chunks each, instead of whole ones)

Router names besides the peers: `microserve+otel` is this tree's router with tracing on (every request
sampled, exported over OTLP/HTTP to a sink in this process that decodes nothing and answers 200), and
`microserve+otel1%` the same with 1% of the traces sampled (`traceidratio`);
`microserve@PATH` is the router of another source tree (e.g. a `git worktree` of the code before a change),
for a before/after in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from microserve.machine import describe_machine
from microserve.processes import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".venv-peers" / "bin"
BODY = '{"model":"mock","messages":[{"role":"user","content":"Say hi."}],"max_tokens":8}'


def request_body(stream_tokens: int) -> str:
    if not stream_tokens:
        return BODY
    return (
        '{"model":"mock","messages":[{"role":"user","content":"Say hi."}],"stream":true,'
        f'"max_tokens":{stream_tokens}}}'
    )


def lua(body: str) -> str:
    return f"""wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""


def answers(url: str) -> bool:
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", data=BODY.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def process(
    cmd: list[str], url: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> Iterator[str]:
    proc = ManagedProcess(cmd, url, env)
    try:
        deadline = time.monotonic() + timeout
        while not answers(url):
            if proc.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not come up:\n{proc.output()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.stop(timeout=10)


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that reads each export and answers 200: the cost measured is the router's."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def router_env(name: str, sink: str) -> dict[str, str]:
    """What a router variant needs in its environment: tracing on, or another tree's code."""
    if name == "microserve+otel":
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": sink, "OTEL_TRACES_SAMPLER": "always_on"}
    if name == "microserve+otel1%":
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
            "OTEL_TRACES_SAMPLER": "traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
        }
    if name.startswith("microserve@"):
        return {"PYTHONPATH": str(Path(name.partition("@")[2]).resolve())}
    return {}


def router_cmd(name: str, port: int, workers: list[str]) -> list[str]:
    # `-P`: another tree's code comes from its PYTHONPATH, not from the current directory that `-m` would
    # put first on the path (without it, `microserve@PATH` run from this checkout timed this checkout)
    flags = ["-P"] if name.startswith("microserve@") else []
    if name.startswith(("microserve+otel", "microserve@")):
        name = "microserve"
    if name == "microserve":
        cmd = [
            sys.executable,
            *flags,
            "-m",
            "microserve",
            "--log-level",
            "warning",
            "router",
            "--port",
            str(port),
            "--policy",
            "round_robin",
        ]
        for w in workers:
            cmd += ["--worker", f"{w},kind=openai,model=mock"]
        return cmd
    peers = {
        "sglang-router": ([str(PEERS / "python"), "-m", "sglang_router.launch_router"], "warn"),
        "vllm-router": ([str(PEERS / "vllm-router")], "warning"),
    }
    if name in peers:
        launcher, quiet = peers[name]
        common = ["--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin", "--log-level", quiet]
        return [*launcher, *common, "--worker-urls", *workers]
    raise ValueError(name)


def wrk(url: str, connections: int, duration: int, body: str = BODY) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua(body))
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            f.name,
            f"{url}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    Path(f.name).unlink()
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)),
        "p99_ms": _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)),
        "errors": int(errors.group(1)) if errors else 0,
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--routers", default="microserve,sglang-router,vllm-router")
    ap.add_argument("--out", default=None)
    ap.add_argument("--stream", type=int, default=0, metavar="TOKENS", help="streamed answers, TOKENS chunks")
    args = ap.parse_args()
    body = request_body(args.stream)
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {}
    ports = [free_port(), free_port()]
    worker_urls = [f"http://127.0.0.1:{p}" for p in ports]
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(otlp_sink())
        for p, url in zip(ports, worker_urls, strict=True):
            stack.enter_context(
                process([sys.executable, str(ROOT / "benchmarks" / "mock_worker.py"), str(p)], url)
            )
        results["direct"] = {c: wrk(worker_urls[0], c, args.duration, body) for c in levels}
        for name in args.routers.split(","):
            port = free_port()
            cmd, env = router_cmd(name, port, worker_urls), router_env(name, sink)
            with process(cmd, f"http://127.0.0.1:{port}", env=env) as url:
                wrk(url, 8, 2, body)  # warm-up
                results[name] = {c: wrk(url, c, args.duration, body) for c in levels}

    date = dt.date.today().isoformat()
    answers = f"streamed answers of {args.stream} chunks" if args.stream else "whole answers"
    setup = f"2 mock workers, round robin, {answers}, wrk {args.duration} s"
    print(f"# router overhead — {date}, {describe_machine()}, {setup}")
    print("| target | concurrency | requests/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for name, by_c in results.items():
        for c, r in by_c.items():
            base = results["direct"][c]
            added = "- | -"
            if name != "direct":
                added = f"{r['p50_ms'] - base['p50_ms']:.2f} | {r['p99_ms'] - base['p99_ms']:.2f}"
            row = f"{r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {added} | {r['errors']}"
            print(f"| {name} | {c} | {row} |")
    if "sglang-router" in results and "microserve" in results:
        for c in levels:
            ratio = results["microserve"][c]["rps"] / results["sglang-router"][c]["rps"]
            print(f"microserve / sglang-router requests/s at concurrency {c}: {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"date": date, "machine": describe_machine(), "setup": setup, "results": results}, indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
