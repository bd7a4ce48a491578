"""`microserve serve --backend sim` as a user runs it: it starts, serves, restarts an engine that crashed,
and stops everything (router and engines) on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from microserve.processes import ManagedProcess, free_port

pytestmark = pytest.mark.slow

DEADLINE_S = 60.0


def children(pid: int) -> set[int]:
    """Live child processes of `pid` (Linux /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone while we looked
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_starts_serves_restarts_a_crashed_engine_and_stops_on_sigterm(tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    coefficients = {"step_overhead_s": 0.005, "per_token_s": 0.0, "per_attention_pair_s": 0.0,
                    "per_kv_gather_token_s": 0.0, "per_sample_s": 0.0}  # fmt: skip
    profile.write_bytes(
        orjson.dumps({"format": "microserve-cost-model", "version": 1, "coefficients": coefficients})
    )
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "serve", "--backend", "sim", "--sim-profile", str(profile),
           "--port", str(port), "--health-interval", "0.2"]  # fmt: skip
    serve = ManagedProcess(cmd, f"http://127.0.0.1:{port}")
    try:
        serve.wait_ready(timeout=180)
        assert f"serving on http://127.0.0.1:{port}/v1" in serve.output()
        engine_urls = re.findall(r"http://127\.0\.0\.1:\d+", serve.output().split("engines:")[1])
        assert len(engine_urls) == 2 and all(ready(u) for u in engine_urls)  # the default: two engines
        engines = children(serve.proc.pid)
        assert len(engines) == 2

        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert chat.choices[0].finish_reason == "length" and len(chat.choices[0].message.content.split()) == 5

        # An engine crashes: requests keep being answered, and the supervisor starts it again.
        crashed = min(engines)
        os.kill(crashed, signal.SIGKILL)
        for _ in range(4):
            r = client.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=3)
            assert r.choices[0].finish_reason == "length"
        wait_for(lambda: len(children(serve.proc.pid) - {crashed}) == 2, "the engine to be restarted")
        wait_for(lambda: all(ready(u) for u in engine_urls), "the restarted engine to be ready")
        engines = children(serve.proc.pid)

        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(timeout=DEADLINE_S) == 0
        assert "microserve: stopped" in serve.output()
        assert not [pid for pid in engines if Path(f"/proc/{pid}").exists()]  # waited for, none orphaned
        assert not any(ready(u) for u in [serve.url, *engine_urls])
    finally:
        serve.stop()
