"""Per-attempt deadlines: the first byte and the stall between chunks follow the engine's measured step
time with floors; a worker that misses one has its circuit tripped. End to end: one of three sim engines
frozen (SIGSTOP) under streaming load costs no request, and no stream waits out the freeze."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import orjson
import pytest

from microserve.processes import ManagedProcess
from microserve.router.breaker import BreakerConfig, CircuitBreaker, CircuitState
from microserve.router.config import RouterConfig
from microserve.router.deadlines import DeadlineConfig, attempt_deadlines
from microserve.router.router import Router
from microserve.router.workers import LoadReport, WorkerKind, WorkerSpec
from tests.fleet import sim_fleet
from tests.router_fakes import RouterClient, serving

STEP_S = 0.02


def load(step_s: float | None, waiting: int = 0, max_num_seqs: int | None = 64) -> LoadReport:
    return LoadReport(waiting, 0, 0.0, 0.0, None, step_s, max_num_seqs)


def test_deadlines_follow_the_step_time_above_their_floors() -> None:
    config = DeadlineConfig(first_byte_floor_s=5.0, stall_floor_s=2.0, first_byte_steps=100, stall_steps=25)
    assert attempt_deadlines(None, config).first_byte_s == 5.0
    assert attempt_deadlines(load(0.01), config).stall_s == 2.0  # 25 fast steps: the floor
    slow = attempt_deadlines(load(0.2), config)
    assert (slow.first_byte_s, slow.stall_s) == (pytest.approx(20.0), pytest.approx(5.0))
    # Two batches queued ahead on the engine: the first byte may take three times as long.
    assert attempt_deadlines(load(0.2, waiting=128), config).first_byte_s == pytest.approx(60.0)
    off = attempt_deadlines(load(0.2), DeadlineConfig(enabled=False))
    assert off.first_byte_s == off.stall_s == float("inf")
    with pytest.raises(ValueError, match="floors"):
        DeadlineConfig(stall_floor_s=0)


def test_a_trip_opens_the_circuit_at_once_and_longer_from_half_open() -> None:
    now = [0.0]
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=5, open_s=1.0, max_open_s=8.0), lambda: now[0])
    breaker.trip()
    assert breaker.state is CircuitState.OPEN and not breaker.allows()
    now[0] = 1.0
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.trip()  # the trial froze too: twice as long away
    now[0] = 2.5
    assert breaker.state is CircuitState.OPEN
    now[0] = 3.0
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.on_success()
    assert breaker.state is CircuitState.CLOSED


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ManagedProcess]]:
    with sim_fleet(tmp_path_factory.mktemp("engines"), 3, STEP_S) as started:
        yield started


async def timed_stream(client: RouterClient, i: int, max_tokens: int) -> tuple[float, bytes]:
    """The longest wait for a byte of one streamed completion (from the request on), and its body."""
    body = {"prompt": f"Request {i}: tell me a story.", "max_tokens": max_tokens, "stream": True}
    last = time.monotonic()
    longest = 0.0
    parts = []
    async with client.post("/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for data in resp.content.iter_any():
            now = time.monotonic()
            longest, last = max(longest, now - last), now
            parts.append(data)
    return longest, b"".join(parts)


@pytest.mark.slow
async def test_a_frozen_engine_under_streaming_load_costs_no_request(engines: list[ManagedProcess]) -> None:
    floors = DeadlineConfig(first_byte_floor_s=3.0, stall_floor_s=1.5)
    workers = [WorkerSpec(e.url, kind=WorkerKind.MICROSERVE) for e in engines]
    router = Router(RouterConfig(workers=workers, deadlines=floors))
    victim_process = engines[0]
    hang_s = 8.0
    async with serving(router) as client:
        victim = router.pool.get(victim_process.url)
        assert victim.load is not None and victim.load.max_num_seqs  # the engine reports its batch size
        stop = asyncio.Event()
        results: list[tuple[float, bytes]] = []

        async def client_loop(k: int) -> None:
            i = 0
            while not stop.is_set():
                results.append(await timed_stream(client, k * 1000 + i, 60))
                i += 1

        loops = [asyncio.create_task(client_loop(k)) for k in range(9)]
        deadline = time.monotonic() + 30
        # Freeze it once streams on it are well under way (a first round done, a second one started).
        while len(results) < 9 or victim.in_flight < 2:
            assert time.monotonic() < deadline, "no streams in flight on the victim"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        os.kill(victim_process.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(hang_s)
            assert victim.errors["stalled"] >= 1 and victim.breaker.state is not CircuitState.CLOSED
        finally:
            os.kill(victim_process.proc.pid, signal.SIGCONT)
        stop.set()
        await asyncio.gather(*loops)
    longest = max(gap for gap, _ in results)
    for _, body in results:
        assert b'"error"' not in body and body.endswith(b"data: [DONE]\n\n"), body[-300:]
        assert all(orjson.loads(f[6:]) for f in body.split(b"\n\n") if f.startswith(b"data: {"))
    # No stream waited out the freeze: at worst one missed deadline, then another engine went on.
    assert longest < floors.first_byte_floor_s + 2.0 < hang_s, longest
    # Streams cut by the freeze went on elsewhere; those that had no byte yet were retried.
    assert router.metrics.continuations.labels("completed")._value.get() >= 1
