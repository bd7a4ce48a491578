"""Issue 20, faults 5 and 6, over real processes (sim backend): KV moves only between engines that share
the internal token (`serve` makes one), a remote_send to an arbitrary URL is refused, reservations are
bounded per requester, /metrics sits behind its token; and when every engine of `serve` died, clients get
503 with Retry-After and no internal address while /ready turns 503 at once."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from microserve.engine_client import EngineClient, EngineError
from microserve.peer_auth import PROOF_PATH
from microserve.processes import ManagedProcess, engine_process, free_port
from tests.test_peer_auth import _ok, recorder
from tests.test_router_serve import children, ready, wait_for

pytestmark = pytest.mark.slow

TOKEN = "e2e-internal-token"
METRICS_TOKEN = "e2e-metrics-token"
ENV = {"MICROSERVE_INTERNAL_TOKEN": TOKEN, "MICROSERVE_METRICS_TOKEN": METRICS_TOKEN}
# 64 blocks of 16 tokens; one requester may hold half of them (a 256-token context is 16 blocks).
ENGINE = ("--backend", "sim", "--max-model-len", "256", "--num-kv-blocks", "64")
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[str, str]]:
    with engine_process(*ENGINE, env=ENV) as a, engine_process(*ENGINE, env=ENV) as b:
        yield a, b


def ids(seed: int, n: int) -> list[int]:
    return [100 + (seed * 7919 + i * 104729) % 30000 for i in range(n)]


async def test_remote_send_to_an_arbitrary_url_is_refused(engines) -> None:
    a_url, b_url = engines
    prompt = ids(1, 40)
    async with EngineClient(a_url, internal_token=TOKEN) as a, EngineClient(b_url, internal_token=TOKEN) as b:
        addr = await b.prep_recv("ssrf-1", prompt, end=32)  # a real reservation's address, sent elsewhere
        async with recorder(_ok) as (url, seen):
            for dst in (url, f"{url}/internal/admin"):
                with pytest.raises(EngineError) as err:
                    await a.remote_send("ssrf-1", prompt, addr, dst, end=32)
                assert err.value.status == 403 and err.value.code == "peer_not_authenticated"
        # The stranger got one challenge (nonce and proof, no token), never KV, never the path asked for.
        assert [(m, p) for m, p, _, _ in seen.seen] == [("POST", PROOF_PATH)]
        _, _, headers, body = seen.seen[0]
        assert "Authorization" not in headers and TOKEN.encode() not in body
        assert await b.release("ssrf-1")


async def test_kv_moves_between_engines_that_share_the_token(engines) -> None:
    a_url, b_url = engines
    prompt = ids(2, 100)
    greedy = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    async with EngineClient(a_url, internal_token=TOKEN) as a, EngineClient(b_url, internal_token=TOKEN) as b:
        want = (await a.completions(prompt=prompt, **greedy))["choices"][0]["text"]
        addr = await b.prep_recv("pd-1", prompt, end=99)
        sent = await a.remote_send("pd-1", prompt, addr, b, begin=addr.matched, end=99)
        assert sent["sent_tokens"] == 99 - addr.matched
        out = await b.start_generate("pd-1", prompt, begin=99, **greedy)
        assert out["choices"][0]["text"] == want


async def test_one_requester_cannot_reserve_most_of_the_cache(engines) -> None:
    _, b_url = engines
    async with EngineClient(b_url, internal_token=TOKEN) as b:
        await b.prep_recv("res-1", ids(3, 256), end=256)  # 16 blocks
        await b.prep_recv("res-2", ids(4, 256), end=256)  # 32 of 64: this requester's share
        with pytest.raises(EngineError) as err:
            await b.prep_recv("res-3", ids(5, 256), end=256)
        assert err.value.status == 429 and err.value.code == "reservation_limit"
        load = await b.load()
        assert load["kv_blocks_free"] >= load["kv_blocks_total"] // 2
        assert await b.release("res-1")
        await b.prep_recv("res-3", ids(5, 256), end=256)  # its share came back with the release
        for rid in ("res-2", "res-3"):
            assert await b.release(rid)


def test_the_engines_metrics_need_the_metrics_token(engines) -> None:
    a_url, _ = engines
    assert httpx.get(f"{a_url}/metrics").status_code == 401
    ok = httpx.get(f"{a_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert ok.status_code == 200 and "vllm:num_requests_waiting" in ok.text
    assert httpx.get(f"{a_url}/load").status_code == 200


def test_serve_keeps_its_token_out_of_argv_and_answers_503_when_every_engine_died(monkeypatch) -> None:
    monkeypatch.delenv("MICROSERVE_INTERNAL_TOKEN", raising=False)  # serve must make one
    port = free_port()
    cmd = [sys.executable, "-m", "microserve", "serve", "--backend", "sim", "--port", str(port),
           "--strategy", "pd", "--health-interval", "0.5"]  # fmt: skip
    serve = ManagedProcess(cmd, f"http://127.0.0.1:{port}")
    try:
        serve.wait_ready(timeout=180)
        engine_urls = re.findall(r"http://127\.0\.0\.1:\d+", serve.output().split("engines:")[1])
        pids = children(serve.proc.pid)
        assert len(pids) == 2 == len(engine_urls)
        # A token was made for the engines: in their environment, not on any command line.
        tokens = {_environ(pid).get("MICROSERVE_INTERNAL_TOKEN") for pid in pids}
        [token] = tokens
        assert token and len(token) >= 32
        for pid in [serve.proc.pid, *pids]:
            assert token not in Path(f"/proc/{pid}/cmdline").read_text()
        refused = httpx.post(
            f"{engine_urls[0]}/microserving/prep_recv", json={"request_id": "x", "prompt": [1]}
        )
        assert refused.status_code == 401
        # pd moves KV between the two engines: they authenticate each other with the generated token.
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3}
        assert httpx.post(f"{serve.url}/v1/completions", json=body, timeout=30).status_code == 200

        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not (children(serve.proc.pid) & pids), "the engines to die")
        resp = httpx.post(f"{serve.url}/v1/completions", json=body, timeout=30)
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "1", resp.text
        assert "127.0.0.1" not in resp.text and resp.headers["X-Request-Id"] in resp.text
        assert orjson.loads(resp.text)["error"]["code"] == "no_worker_available"
        status = httpx.get(f"{serve.url}/ready")
        assert status.status_code == 503 and status.json()["workers_available"] == 0

        # The supervisor restarts them (each a new process: slow on a loaded machine); the health checks
        # bring them back.
        deadline = time.monotonic() + 300
        while not ready(serve.url):
            assert time.monotonic() < deadline, f"the engines never came back:\n{serve.output()}"
            time.sleep(0.2)
        assert httpx.post(f"{serve.url}/v1/completions", json=body, timeout=30).status_code == 200
    finally:
        serve.stop()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)
