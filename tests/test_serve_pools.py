"""`microserve serve --roles prefill:1,decode:1 --strategy pd --scale decode:0:1` as a user runs it (real
sim-backend processes): a chat request goes through PD (the prompt's KV on the prefill engine, the tokens on
the decode engine); idle, the decode pool scales to zero while the prefill pool stays; the next request is
held while a decode engine starts, then answered 200 through PD."""

from __future__ import annotations

import re
import sys

import httpx
import orjson
import pytest

from microserve.processes import ManagedProcess, free_port
from tests.test_local_fleet import TOKEN, chat, metric, wait_for

pytestmark = pytest.mark.slow


def roles(url: str) -> dict[str, str]:
    """The router's workers: url -> role."""
    r = httpx.get(f"{url}/admin/workers", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    r.raise_for_status()
    return {str(w["url"]): str(w["role"]) for w in r.json()["workers"]}


def generated(engine: str) -> float:
    text = httpx.get(f"{engine}/metrics", timeout=5).text
    match = re.search(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", text, re.M)
    assert match, "vllm:generation_tokens_total not in the engine's /metrics"
    return float(match.group(1))


def test_pd_pools_serve_through_pd_and_the_decode_pool_scales_to_zero_and_back(tmp_path: str) -> None:
    profile = f"{tmp_path}/profile.json"
    coefficients = {"step_overhead_s": 0.01, "per_token_s": 0.0, "per_attention_pair_s": 0.0,
                    "per_kv_gather_token_s": 0.0, "per_sample_s": 0.0}  # fmt: skip
    with open(profile, "wb") as f:
        f.write(orjson.dumps({"format": "microserve-cost-model", "version": 1, "coefficients": coefficients}))
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "serve", "--backend", "sim", "--sim-profile", profile,
           "--port", str(port), "--health-interval", "0.2", "--admin-token", TOKEN, "--queue-timeout", "150",
           "--roles", "prefill:1,decode:1", "--strategy", "pd", "--scale", "decode:0:1",
           "--scale-down-after", "3", "--handoff-tokens", "0"]  # fmt: skip
    serve = ManagedProcess(cmd, f"http://127.0.0.1:{port}")
    url = serve.url
    try:
        wait_for(lambda: "serving on" in serve.output(), "the router")
        workers = roles(url)
        assert sorted(workers.values()) == ["decode", "prefill"]
        (prefill,) = (u for u, r in workers.items() if r == "prefill")
        (decode,) = (u for u, r in workers.items() if r == "decode")

        assert chat(url) == 200
        # Through PD: one pick on each engine, the tokens generated on the decode engine only.
        assert (
            metric(
                url, f'microserve_router_policy_decisions_total{{policy="round_robin",worker="{prefill}"}}'
            )
            == 1
        )
        assert generated(decode) > 0 and generated(prefill) == 0

        # Idle: the decode pool goes to zero, the prefill pool (1:1) stays.
        wait_for(lambda: "decode" not in roles(url).values(), "the decode pool at zero")
        assert roles(url) == {prefill: "prefill"}
        assert metric(url, 'microserve_router_desired_replicas{role="decode"}') == 0
        assert metric(url, 'microserve_router_desired_replicas{role="prefill"}') == 1

        # The next request is held while a decode engine starts, then answered through PD.
        assert chat(url) == 200
        workers = roles(url)
        (woken,) = (u for u, r in workers.items() if r == "decode")
        assert woken != decode and workers[prefill] == "prefill"
        assert generated(woken) > 0 and generated(prefill) == 0
        assert metric(url, "microserve_router_queue_wait_seconds_count") >= 1
    finally:
        serve.stop()
