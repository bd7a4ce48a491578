"""The bench runner against a scripted server: arrivals, concurrency cap, duration, multi-turn, progress."""

from __future__ import annotations

import io
import math
import time
from collections.abc import AsyncIterator

import pytest
from rich.console import Console

from microserve.bench.arrivals import ArrivalKind
from microserve.bench.runner import LiveProgress, RunConfig, run_benchmark
from microserve.bench.sender import Target
from microserve.bench.workloads import Endpoint, MultiTurnWorkload, RandomWorkload
from tests.bench_fakes import FakeServer, start

SMALL = RandomWorkload(input_len=8, output_len=3, seed=0)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeServer, Target]]:
    server = FakeServer(token_delay=0.01)
    http = await start(server)
    try:
        yield server, Target(str(http.make_url("")).rstrip("/"), "ok")
    finally:
        await http.close()


async def test_max_concurrency_caps_requests_in_flight(fake: tuple[FakeServer, Target]) -> None:
    server, target = fake
    result = await run_benchmark(target, SMALL, RunConfig(max_concurrency=3, num_requests=12))
    assert server.max_in_flight == 3
    assert [r.request.index for r in result.records] == list(range(12))
    assert all(r.success for r in result.records)
    # Rate inf with a cap is a closed loop: a request is issued when a slot frees, so it never queues.
    assert max(r.queue_time for r in result.records) < 0.05


async def test_queued_arrivals_wait_for_a_slot(fake: tuple[FakeServer, Target]) -> None:
    server, target = fake
    config = RunConfig(request_rate=200.0, arrival=ArrivalKind.FIXED, max_concurrency=1, num_requests=5)
    result = await run_benchmark(target, SMALL, config)
    assert server.max_in_flight == 1
    # Each request takes about 30 ms while arrivals come every 5 ms: the last one queues for the others.
    assert result.records[-1].queue_time > 0.05
    assert result.records[0].queue_time < 0.02


async def test_fixed_rate_keeps_its_schedule(fake: tuple[FakeServer, Target]) -> None:
    _, target = fake
    config = RunConfig(request_rate=20.0, arrival=ArrivalKind.FIXED, num_requests=6)
    result = await run_benchmark(target, SMALL, config)
    arrivals = [r.arrival for r in result.records]
    # The schedule is absolute: a request sent late does not push the next ones back, so two may come
    # closer than 50 ms apart; none is ever sent before its time (timer resolution aside).
    assert all(t - arrivals[0] > i * 0.05 - 0.005 for i, t in enumerate(arrivals))
    assert arrivals[-1] - arrivals[0] == pytest.approx(0.25, abs=0.1)


async def test_duration_run_stops_by_itself(fake: tuple[FakeServer, Target]) -> None:
    _, target = fake
    begin = time.perf_counter()
    config = RunConfig(request_rate=40.0, arrival=ArrivalKind.FIXED, duration_s=0.5)
    result = await run_benchmark(target, SMALL, config)
    assert 18 <= len(result.records) <= 20  # arrivals every 25 ms, before the 0.5 s deadline
    assert time.perf_counter() - begin < 1.5
    assert result.duration_s >= 0.45

    closed = RunConfig(request_rate=math.inf, max_concurrency=2, duration_s=0.3)
    result = await run_benchmark(target, SMALL, closed)
    assert len(result.records) >= 4 and all(r.success for r in result.records)


async def test_multi_turn_sends_the_real_answers_back(fake: tuple[FakeServer, Target]) -> None:
    server, target = fake
    workload = MultiTurnWorkload(turns=3, system_prompts=1, system_prompt_len=5, turn_len=3, output_len=2)
    result = await run_benchmark(target, workload, RunConfig(max_concurrency=2, num_requests=7))
    by_turn = {(r.request.conversation, r.request.turn): r for r in result.records}
    assert sorted(by_turn) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    for (conv, turn), r in by_turn.items():
        assert r.success
        if turn:
            previous = by_turn[(conv, turn - 1)]
            assert r.request.messages[-2] == {"role": "assistant", "content": previous.text}  # type: ignore[index]
            assert r.request.messages[: len(previous.request.messages)] == previous.request.messages  # type: ignore[index, arg-type]
            assert r.start > previous.chunk_times[-1]  # sent only after the answer arrived
    assert len(server.bodies) == 7


async def test_a_failed_turn_skips_the_rest_of_its_conversation(fake: tuple[FakeServer, Target]) -> None:
    _, target = fake
    missing = Target(target.base_url, "missing")
    result = await run_benchmark(missing, MultiTurnWorkload(turns=3), RunConfig(num_requests=6))
    assert len(result.records) == 2 and result.skipped == 4
    assert all(r.error and r.error.startswith("HTTP 404") for r in result.records)


async def test_live_progress_counts_the_run(fake: tuple[FakeServer, Target]) -> None:
    _, target = fake
    out = io.StringIO()
    config = RunConfig(num_requests=6, max_concurrency=2)
    with LiveProgress("rate inf", config, console=Console(file=out, width=120)) as progress:
        await run_benchmark(target, SMALL, config, progress)
    assert (progress.done, progress.failed, progress.in_flight) == (6, 0, 0)
    assert "6/6" in out.getvalue()


async def test_endpoint_mismatch_is_refused_before_sending(fake: tuple[FakeServer, Target]) -> None:
    server, target = fake
    with pytest.raises(ValueError, match="--endpoint chat"):
        await run_benchmark(
            Target(target.base_url, "ok", endpoint=Endpoint.COMPLETIONS),
            MultiTurnWorkload(),
            RunConfig(num_requests=1),
        )
    assert server.served == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"num_requests": 3, "duration_s": 1.0}, "exactly one of"),
        ({"duration_s": 5.0}, "needs --max-concurrency"),
        ({"num_requests": 3, "burstiness": 2.0, "arrival": ArrivalKind.POISSON}, "needs --arrival gamma"),
        ({"num_requests": 3, "max_concurrency": 0}, "--max-concurrency must be positive"),
    ],
)
def test_run_config_refuses_unbounded_or_contradictory_runs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunConfig(**kwargs)
    assert RunConfig(num_requests=1, burstiness=0.5).kind is ArrivalKind.GAMMA
