"""The simulated router runs the router's own retry loop, admission queue and per-attempt deadlines on
virtual time: a frozen replica costs no request, and overload is refused at once instead of queued."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from microserve.bench.sender import RequestRecord
from microserve.bench.workloads import BenchRequest
from microserve.engine.sampling import SamplingParams
from microserve.model.loader import resolve_model
from microserve.model.tokenizer import Tokenizer
from microserve.router.admission import AdmissionConfig
from microserve.router.deadlines import DeadlineConfig
from microserve.router.request import Route
from microserve.runner.cost_model import CostModel
from microserve.runner.sim_runner import plain_word_tokens
from microserve.simulator.clock import run_virtual
from microserve.simulator.handle import Answer, SimRequest
from microserve.simulator.host import MODEL, FleetConfig, SimRouter, parse_roles
from microserve.simulator.replica import ReplicaConfig, SimReplica


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(resolve_model("smollm2-135m"))


def fleet(**kw: object) -> FleetConfig:
    replica = ReplicaConfig(CostModel.default(), num_blocks=1024, max_model_len=4096, max_num_seqs=8)
    return FleetConfig(parse_roles("both", 3), replica, **kw)  # type: ignore[arg-type]


def request(i: int, output_len: int, stream: bool = True) -> SimRequest:
    prompt = [100 + (i * 7 + k) % 500 for k in range(64)]
    record = RequestRecord(BenchRequest(i, output_len, prompt=prompt))
    body = {"model": MODEL, "prompt": prompt, "max_tokens": output_len, "stream": stream, "ignore_eos": True}
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    return SimRequest(f"r{i}", Route.COMPLETIONS, body, prompt, Answer(record), params)


async def drive(
    config: FleetConfig,
    tokenizer: Tokenizer,
    n: int,
    gap_s: float,
    output_len: int,
    freeze: float = 0.0,
    stream: bool = True,
) -> list[RequestRecord]:
    """`n` requests, one every `gap_s`; with `freeze`, replica 0 hangs that long from the fifth on."""
    words = plain_word_tokens(tokenizer)
    replicas = [SimReplica(f"replica-{i}", config.replica, tokenizer, words) for i in range(3)]
    router = SimRouter(config, replicas)
    router.start()
    loop = asyncio.get_running_loop()
    tasks, records = [], []
    try:
        for i in range(n):
            if i == 5 and freeze:
                replicas[0].freeze(freeze)
            req = request(i, output_len, stream)
            req.answer.record.start = loop.time()
            records.append(req.answer.record)
            tasks.append(asyncio.create_task(router.serve(req)))
            await asyncio.sleep(gap_s)
        await asyncio.gather(*tasks)
    finally:
        await router.stop()
    return records


def longest_gap(record: RequestRecord) -> float:
    times = [record.start, *record.chunk_times]
    return max(b - a for a, b in itertools.pairwise(times))


def test_whole_requests_take_the_strategys_whole_path_to_the_same_answer(tokenizer: Tokenizer) -> None:
    # A non-streamed request runs `serve_whole` (the router's path for one), a streamed one `serve`.
    whole = run_virtual(drive(fleet(), tokenizer, 6, 0.1, 20, stream=False))
    streamed = run_virtual(drive(fleet(), tokenizer, 6, 0.1, 20))
    assert [r.error for r in whole] == [None] * 6
    assert [r.output_tokens for r in whole] == [r.output_tokens for r in streamed] == [20] * 6


def test_a_frozen_replica_costs_no_request_with_deadlines(tokenizer: Tokenizer) -> None:
    # The default cost model steps in 55-90 ms: 20 steps for a first byte, 10 between chunks.
    deadlines = DeadlineConfig(first_byte_floor_s=1.0, stall_floor_s=0.5, first_byte_steps=20, stall_steps=10)
    records = run_virtual(drive(fleet(deadlines=deadlines), tokenizer, 30, 0.5, 100, freeze=60.0))
    assert [r.error for r in records] == [None] * 30
    # Each stream waited at most one deadline (and a retry's prefill), never the 60 s hang.
    assert max(longest_gap(r) for r in records) < 20 * 0.09 + 1.0
    # Without deadlines the same freeze holds the requests on the frozen replica for the whole hang.
    stuck = run_virtual(drive(fleet(), tokenizer, 30, 0.5, 100, freeze=60.0))
    assert max(longest_gap(r) for r in stuck) >= 59.0


def test_admission_refuses_overload_at_once_and_bounds_the_wait(tokenizer: Tokenizer) -> None:
    admission = AdmissionConfig(max_queue_wait_s=1.0, retry_after_s=1)
    records = run_virtual(drive(fleet(admission=admission), tokenizer, 400, 0.005, 64))
    served = [r for r in records if r.error is None]
    refused = [r for r in records if r.error is not None]
    assert served and refused and all(r.error.startswith("429") for r in refused)  # type: ignore[union-attr]
    # Refused at the instant they came; admitted ones started within their queue budget (+ a prefill).
    assert all(not r.chunk_times for r in refused)
    assert max(r.ttft for r in served) < admission.max_queue_wait_s + 1.0
    # The same overload with no admission queue: everything is accepted and waits in the engines.
    queued = run_virtual(drive(fleet(), tokenizer, 400, 0.005, 64))
    assert all(r.error is None for r in queued)
    assert max(r.ttft for r in queued) > 3 * max(r.ttft for r in served)
