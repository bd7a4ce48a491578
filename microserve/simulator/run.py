"""Drive a bench workload through a simulated fleet on virtual time, and report it as `microserve bench` does.

Arrivals, max concurrency and multi-turn follow-ups behave as in bench's runner; the clock is virtual.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

from microserve.api.errors import APIError
from microserve.bench.arrivals import interarrival_gaps
from microserve.bench.metrics import Summary, summarize
from microserve.bench.runner import RunConfig, RunResult
from microserve.bench.sender import RequestRecord
from microserve.bench.workloads import BenchRequest, ConversationSource, Endpoint, Workload
from microserve.engine.sampling import SamplingParams
from microserve.model.tokenizer import Tokenizer
from microserve.router.prompt_ids import prompt_ids
from microserve.router.request import Route
from microserve.runner.sim_runner import plain_word_tokens
from microserve.simulator.clock import run_virtual
from microserve.simulator.handle import Answer, SimRequest
from microserve.simulator.host import MODEL, FleetConfig, SimRouter
from microserve.simulator.replica import SimReplica


@dataclass(slots=True)
class SimRun:
    """One simulated run: the bench result (virtual seconds), its metrics, and what the fleet did."""

    result: RunResult
    summary: Summary
    replicas: list[dict[str, Any]]
    wall_s: float  # real seconds the simulation took
    retries: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Simulator:
    """Runs workloads on a fleet; the tokenizer (for text prompts, ids and vocabulary) loads once."""

    def __init__(self, fleet: FleetConfig, tokenizer: Tokenizer, endpoint: Endpoint = Endpoint.CHAT) -> None:
        self.fleet = fleet
        self.tokenizer = tokenizer
        self.endpoint = endpoint
        self.vocab_words = plain_word_tokens(tokenizer)

    def run(
        self,
        workload: Workload,
        config: RunConfig,
        percentiles: tuple[float, ...] = (90.0, 99.0),
        slos: dict[str, float] | None = None,
    ) -> SimRun:
        """One run on a fresh fleet (empty caches), to completion of every request."""
        workload.check_endpoint(self.endpoint)
        wall = time.perf_counter()
        result, replicas, retries = run_virtual(self._run(workload, config))
        wall_s = time.perf_counter() - wall
        summary = summarize(result.records, result.duration_s, percentiles, slos or {}, result.skipped)
        return SimRun(result, summary, replicas, wall_s, retries)

    def request(self, bench: BenchRequest, record: RequestRecord, keep_tokens: bool) -> SimRequest:
        """The routed request the router would see for `bench`, with the engine's prompt ids."""
        route = Route.COMPLETIONS if self.endpoint is Endpoint.COMPLETIONS else Route.CHAT
        body = {
            "model": MODEL,
            **bench.api_input(self.endpoint),
            "max_tokens": bench.expected_output_len,
            "stream": True,
            "ignore_eos": True,
        }
        # Token ids go as they are (the engine checks them); text goes through the engine's tokenization.
        ids = (
            list(bench.prompt) if isinstance(bench.prompt, list) else prompt_ids(self.tokenizer, route, body)
        )
        params = SamplingParams(max_tokens=bench.expected_output_len, ignore_eos=True)
        answer = Answer(record, [] if keep_tokens else None)
        return SimRequest(
            f"sim-{bench.index}", route, body, ids, answer, params, self.fleet.request_timeout_s
        )

    async def _run(
        self, workload: Workload, config: RunConfig
    ) -> tuple[RunResult, list[dict[str, Any]], int]:
        replicas = [
            SimReplica(f"replica-{i}", self.fleet.replica, self.tokenizer, self.vocab_words)
            for i in range(len(self.fleet.roles))
        ]
        router = SimRouter(self.fleet, replicas, seed=config.seed)
        router.start()
        try:
            result = await self._drive(router, workload, config)
        finally:
            await router.stop()
        return result, router.replica_stats(), router.retries

    async def _drive(self, router: SimRouter, workload: Workload, config: RunConfig) -> RunResult:
        """bench's `run_benchmark`, on the virtual clock and with the simulated router as the target."""
        loop = asyncio.get_running_loop()
        source = workload.source(config.num_requests)
        keep_tokens = isinstance(source, ConversationSource)  # only multi-turn reads the answers
        gaps = interarrival_gaps(config.kind, config.request_rate, config.burstiness, config.seed)
        slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        closed_loop = math.isinf(config.request_rate) and slots is not None
        records: list[RequestRecord] = []
        tasks: set[asyncio.Task[None]] = set()
        answered = asyncio.Event()

        async def one(request: BenchRequest, arrival: float) -> None:
            record = RequestRecord(request, arrival=arrival)
            try:
                if slots is not None and not closed_loop:
                    async with slots:
                        req = await send(request, record)
                else:
                    req = await send(request, record)
            finally:
                if closed_loop:
                    slots.release()  # type: ignore[union-attr]
            answer = None
            if record.success and req is not None:
                answer = self.tokenizer.decode(req.answer.token_ids or []) if keep_tokens else ""
            source.complete(request, answer)
            records.append(record)
            answered.set()

        async def send(request: BenchRequest, record: RequestRecord) -> SimRequest | None:
            record.start = loop.time()
            try:
                req = self.request(request, record, keep_tokens)
            except (ValueError, APIError) as exc:  # a trace line the endpoint or the template refuses
                record.error = str(exc)
                return None
            await router.serve(req)
            if record.error is None and not record.chunk_times:
                record.error = "no generated token arrived"
            return req

        async def next_request(deadline: float) -> BenchRequest | None:
            while (request := source.next_ready()) is None and not source.exhausted:
                answered.clear()
                timeout = deadline - loop.time()
                if not tasks or timeout <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(answered.wait(), timeout=None if math.isinf(deadline) else timeout)
            return request

        start = loop.time()
        deadline = start + config.duration_s if config.duration_s else math.inf
        next_at = start
        for gap in gaps:
            next_at += gap
            if next_at >= deadline:
                break
            if next_at > loop.time():
                await asyncio.sleep(next_at - loop.time())
            if closed_loop:
                await slots.acquire()  # type: ignore[union-attr]
            request = await next_request(deadline)
            if request is None or loop.time() >= deadline:
                if closed_loop:
                    slots.release()  # type: ignore[union-attr]
                break
            task = asyncio.create_task(one(request, loop.time()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks))
        duration = loop.time() - start
        records.sort(key=lambda r: r.request.index)
        return RunResult(config, records, duration, skipped=source.skipped, workload=workload.describe())
