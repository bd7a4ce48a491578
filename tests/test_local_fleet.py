"""`microserve serve --min-engines 0 --max-engines 2 --scale-down-after 5` as a user runs it (real processes):
idle -> zero engines; the next request is held while one starts, then answered 200 with its wait in the
metrics; under load it grows, and it shrinks again under light load without failing a request."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from microserve.processes import ManagedProcess, free_port

pytestmark = pytest.mark.slow

TOKEN = "autoscale-admin-token"
DEADLINE_S = 300.0  # an engine start takes a minute or more on a loaded 2-core machine


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def workers(url: str) -> list[dict[str, object]]:
    r = httpx.get(f"{url}/admin/workers", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    r.raise_for_status()
    return r.json()["workers"]  # type: ignore[no-any-return]


def engine_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def chat(url: str, max_tokens: int = 8) -> int:
    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    }
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=180).status_code


def test_scale_to_zero_wake_on_a_request_grow_and_shrink_without_failing(tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    coefficients = {"step_overhead_s": 0.02, "per_token_s": 0.0, "per_attention_pair_s": 0.0,
                    "per_kv_gather_token_s": 0.0, "per_sample_s": 0.0}  # fmt: skip
    profile.write_bytes(
        orjson.dumps({"format": "microserve-cost-model", "version": 1, "coefficients": coefficients})
    )
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "serve", "--backend", "sim", "--sim-profile", str(profile),
           "--port", str(port), "--health-interval", "0.2", "--admin-token", TOKEN, "--queue-timeout", "150",
           "--min-engines", "0", "--max-engines", "2", "--scale-down-after", "5", "--scale-target", "2",
           "--scale-up-cooldown", "1"]  # fmt: skip
    serve = ManagedProcess(cmd, f"http://127.0.0.1:{port}")
    url = serve.url
    try:
        wait_for(lambda: "serving on" in serve.output(), "the router")
        assert workers(url) == []  # idle: zero engines
        assert metric(url, 'microserve_router_desired_replicas{role="both"}') == 0

        # Scale from zero: the request is held while an engine starts, then answered.
        assert chat(url) == 200
        assert metric(url, "microserve_router_queue_wait_seconds_count") == 1
        assert metric(url, "microserve_router_queue_wait_seconds_sum") > 0.1  # an engine start, reported
        up = workers(url)
        assert len(up) == 1 and engine_up(str(up[0]["url"]))

        # Load: 6 clients at once need 3 engines at 2 each; the fleet grows to its max of 2.
        statuses: list[int] = []
        stop = threading.Event()

        def client(light: bool) -> None:
            while not stop.is_set():
                statuses.append(chat(url, 40))
                if light and len(workers(url)) == 1:
                    return

        heavy = [threading.Thread(target=client, args=(False,)) for _ in range(6)]
        for t in heavy:
            t.start()
        wait_for(lambda: len(workers(url)) == 2, "a second engine")
        stop.set()
        for t in heavy:
            t.join()
        stop.clear()
        # Light load (one client) fits in one engine: one goes, drained first, while requests keep coming.
        light = threading.Thread(target=client, args=(True,))
        light.start()
        light.join(timeout=DEADLINE_S)
        assert not light.is_alive()
        assert statuses and set(statuses) == {200}, statuses
        (survivor,) = workers(url)
        surviving_url = str(survivor["url"])
        load = httpx.get(f"{surviving_url}/load", timeout=5).json()
        assert load["waiting"] == 0 and load["running"] == 0 and load["kv_usage"] == 0  # no KV block leaks
        # Before it stopped, the engine that left handed its hottest prefixes to the survivor.
        handed = rf"autoscale: handed off \d+ prefixes .* to {re.escape(surviving_url)}"
        assert re.search(handed, serve.output())

        # Idle again: back to zero engines, every engine process gone.
        wait_for(lambda: workers(url) == [], "zero engines")
        assert not engine_up(surviving_url)
    finally:
        serve.stop()
