"""The engine's HTTP server stack, measured: a `microserve engine --backend sim` of this tree (the lean
server, `microserve/http/server.py`) and of a peer tree (e.g. main before the move: aiohttp) in one run,
requests/s and p50/p99 latency of non-streamed and streamed completions under wrk, rounds interleaved
(this, peer, this, peer...) so that load from elsewhere on the machine hits both alike.

The sim backend keeps the model's cost small and equal on both sides, so the difference is the server.

Setup: wrk (apt-get install wrk). Usage: python benchmarks/engine_http.py --peer /path/to/old/tree
[--duration 8] [--rounds 3] [--connections 32] [--out docs/results/engine-http.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from microserve.machine import describe_machine
from microserve.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "whole, 1 token": '{"prompt":"Say hi.","max_tokens":1}',
    "whole, 16 tokens": '{"prompt":"Say hi.","max_tokens":16,"ignore_eos":true}',
    "streamed, 16 tokens": '{"prompt":"Say hi.","max_tokens":16,"ignore_eos":true,"stream":true}',
}


def write_profile(path: Path, step_s: float) -> Path:
    """A sim cost model where a step costs `step_s` whatever it holds: the server's work shows."""
    coefficients = dict.fromkeys(
        ("per_token_s", "per_attention_pair_s", "per_kv_gather_token_s", "per_sample_s"), 0.0
    )
    model = {"format": "microserve-cost-model", "version": 1,
             "coefficients": {"step_overhead_s": step_s, **coefficients}}  # fmt: skip
    path.write_text(json.dumps(model))
    return path


@contextlib.contextmanager
def engine(tree: Path, profile: Path, timeout: float = 300.0) -> Iterator[str]:
    """A sim engine from `tree` (PYTHONPATH and cwd, as `python -m` puts cwd first on the path)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
           "--sim-profile", str(profile), "--port", str(port), "--max-num-seqs", "256"]  # fmt: skip
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed when the engine is)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/ready", timeout=1) as r:
                if r.status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"the engine of {tree} did not start:\n{log.read().decode()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wrk(url: str, body: str, duration: float, connections: int) -> dict[str, float]:
    script = f'wrk.method = "POST"\nwrk.body = \'{body}\'\nwrk.headers["Content-Type"] = "application/json"\n'
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
        f.write(script)
        f.flush()
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", f.name,
             f"{url}/v1/completions"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failures:\n{out}")
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
    }


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", type=Path, required=True, help="the tree to compare with (its engine server)")
    p.add_argument("--peer-name", default="peer (aiohttp)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load per case and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--step-ms", type=float, default=0.2, help="the sim engine's modelled step time")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    profile = write_profile(Path(tempfile.mkdtemp()) / "profile.json", args.step_ms / 1000)
    trees = {"microserve (lean server)": ROOT, args.peer_name: args.peer.resolve()}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {t: {c: [] for c in CASES} for t in trees}
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(engine(tree, profile)) for name, tree in trees.items()}
        for url in urls.values():  # warm up: first requests compile, allocate, fill caches
            wrk(url, CASES["whole, 1 token"], 2, args.connections)
        for _ in range(args.rounds):
            for case, body in CASES.items():
                for name, url in urls.items():
                    runs[name][case].append(wrk(url, body, args.duration, args.connections))
    summary = {
        name: {
            case: {k: statistics.median(r[k] for r in rs) for k in ("requests_per_s", "p50_ms", "p99_ms")}
            for case, rs in cases.items()
        }
        for name, cases in runs.items()
    }
    ours, peer = summary[next(iter(trees))], summary[args.peer_name]
    print(
        f"{describe_machine()}, {dt.date.today()}; {args.connections} connections, medians of {args.rounds}"
    )
    print(f"{'case':22} {'server':26} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for case in CASES:
        for name in trees:
            s = summary[name][case]
            print(f"{case:22} {name:26} {s['requests_per_s']:8.0f} {s['p50_ms']:8.1f} {s['p99_ms']:8.1f}")
        ratio = ours[case]["requests_per_s"] / peer[case]["requests_per_s"]
        print(f"{case:22} {'ratio (requests/s)':26} {ratio:8.2f}x")
    if args.out is not None:
        record = {
            "machine": describe_machine(),
            "date": str(dt.date.today()),
            "connections": args.connections,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "step_ms": args.step_ms,
            "peer": str(args.peer),
            "summary": summary,
            "runs": runs,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
