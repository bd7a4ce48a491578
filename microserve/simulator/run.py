"""Drive a bench workload through a simulated fleet on virtual time, and report it as `microserve bench` does.

Arrivals, max concurrency and multi-turn follow-ups behave as in bench's runner; the clock is virtual.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from microserve.api.errors import APIError
from microserve.bench.arrivals import interarrival_gaps
from microserve.bench.issuer import issue_requests
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
from microserve.simulator.scaling import SimScaler
from microserve.simulator.tenants import TenantLoad, check_tenants, tenant_report
from microserve.tenants.keys import PRIORITIES


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
        gaps: Iterable[float] | None = None,
        tenants: Sequence[TenantLoad] = (),
    ) -> SimRun:
        """One run on a fresh fleet (empty caches), to completion of every request. `gaps` (seconds between
        arrivals, e.g. a diurnal trace's) replace the config's arrival process. With `tenants`, each sends
        its own stream of the workload at its own rate (the config's rate is then unused), and
        `extra["tenants"]` reports each."""
        workload.check_endpoint(self.endpoint)
        check_tenants(tenants)
        if tenants and gaps is not None:
            raise ValueError("tenants send at their own rates: a load shape applies to one stream")
        wall = time.perf_counter()
        extra: dict[str, Any] = {}
        by_tenant: dict[str, list[RequestRecord]] = {}
        result, replicas, retries = run_virtual(self._run(workload, config, gaps, extra, tenants, by_tenant))
        wall_s = time.perf_counter() - wall
        summary = summarize(result.records, result.duration_s, percentiles, slos or {}, result.skipped)
        if tenants:
            extra["tenants"] = tenant_report(tenants, by_tenant, result.duration_s, percentiles)
        return SimRun(result, summary, replicas, wall_s, retries, extra)

    def request(
        self,
        bench: BenchRequest,
        record: RequestRecord,
        keep_tokens: bool,
        tenant: TenantLoad | None = None,
    ) -> SimRequest:
        """The routed request the router would see for `bench` (from `tenant`), with the engine's prompt
        ids."""
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
        rank = tenant.rank if tenant is not None else PRIORITIES["normal"]
        # The engines' scheduler order, as the router sends it for a key's class: high -1, normal 0, low 1.
        priority = rank - PRIORITIES["normal"]
        params = SamplingParams(max_tokens=bench.expected_output_len, ignore_eos=True, priority=priority)
        answer = Answer(record, [] if keep_tokens else None)
        name = tenant.name if tenant is not None else ""
        return SimRequest(
            f"sim-{name}-{bench.index}" if name else f"sim-{bench.index}",
            route,
            body,
            ids,
            answer,
            params,
            self.fleet.request_timeout_s,
            tenant=name,
            rank=rank,
        )

    def _replica(self, name: str) -> SimReplica:
        return SimReplica(name, self.fleet.replica, self.tokenizer, self.vocab_words)

    async def _run(
        self,
        workload: Workload,
        config: RunConfig,
        gaps: Iterable[float] | None,
        extra: dict[str, Any],
        tenants: Sequence[TenantLoad],
        by_tenant: dict[str, list[RequestRecord]],
    ) -> tuple[RunResult, list[dict[str, Any]], int]:
        loop = asyncio.get_running_loop()
        replicas = [self._replica(f"replica-{i}") for i in range(len(self.fleet.roles))]
        router = SimRouter(self.fleet, replicas, seed=config.seed)
        router.start()
        scaler: SimScaler | None = None
        scaling: asyncio.Task[None] | None = None
        if self.fleet.autoscale is not None:
            scaler = SimScaler(router, self.fleet.autoscale, set(self.fleet.roles), self._replica)
            for url in router.replicas:
                scaler.adopt(url, loop.time())
            scaling = asyncio.create_task(scaler.run())
        start = loop.time()
        try:
            if tenants:
                result = await self._drive_tenants(router, workload, config, tenants, by_tenant)
            else:
                result = await self._drive(router, workload, config, gaps)
        finally:
            if scaling is not None and scaler is not None:
                scaling.cancel()
                await asyncio.gather(scaling, return_exceptions=True)
                await scaler.stop()
            await router.stop()
        end = loop.time()
        if scaler is not None:
            extra["engine_seconds"] = scaler.engine_seconds(end)
            extra["replicas_timeline"] = [(t - start, n) for t, n in scaler.timeline]
            extra["membership"] = {"joined": router.membership.joins, "left": router.membership.leaves}
            if scaler.scaling.handoff is not None:
                extra["handoffs"] = [
                    {"prefixes": len(h.prefixes), "sent_tokens": h.sent_tokens, "sent_bytes": h.sent_bytes,
                     "seconds": h.seconds, "error": h.error}
                    for h in scaler.handoffs
                ]  # fmt: skip
        else:
            extra["engine_seconds"] = len(replicas) * (end - start)
        return result, router.replica_stats(), router.retries

    async def _drive(
        self,
        router: SimRouter,
        workload: Workload,
        config: RunConfig,
        gaps: Iterable[float] | None = None,
        tenant: TenantLoad | None = None,
    ) -> RunResult:
        """bench's `run_benchmark`, on the virtual clock and with the simulated router as the target."""
        loop = asyncio.get_running_loop()
        source = workload.source(config.num_requests)
        keep_tokens = isinstance(source, ConversationSource)  # only multi-turn reads the answers
        if gaps is None:
            gaps = interarrival_gaps(config.kind, config.request_rate, config.burstiness, config.seed)

        async def send(request: BenchRequest, record: RequestRecord) -> str | None:
            record.start = loop.time()
            try:
                req = self.request(request, record, keep_tokens, tenant)
            except (ValueError, APIError) as exc:  # a trace line the endpoint or the template refuses
                record.error = str(exc)
                return None
            await router.serve(req)
            if record.error is None and not record.chunk_times:
                record.error = "no generated token arrived"
            if not record.success:
                return None
            return self.tokenizer.decode(req.answer.token_ids or []) if keep_tokens else ""

        start = loop.time()
        records = await issue_requests(
            source,
            gaps,
            send,
            loop.time,
            request_rate=config.request_rate,
            max_concurrency=config.max_concurrency,
            duration_s=config.duration_s,
        )
        duration = loop.time() - start
        return RunResult(config, records, duration, skipped=source.skipped, workload=workload.describe())

    async def _drive_tenants(
        self,
        router: SimRouter,
        workload: Workload,
        config: RunConfig,
        tenants: Sequence[TenantLoad],
        by_tenant: dict[str, list[RequestRecord]],
    ) -> RunResult:
        """One stream per tenant, at once: each its own prompts (the workload's next run) and arrivals (the
        config's kind at the tenant's rate, its own seed); the run's records are all of theirs."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        runs = await asyncio.gather(
            *(
                self._drive(
                    router,
                    workload.for_run(i),
                    dataclasses.replace(config, request_rate=tenant.rate, seed=config.seed + i),
                    tenant=tenant,
                )
                for i, tenant in enumerate(tenants)
            )
        )
        for tenant, run in zip(tenants, runs, strict=True):
            by_tenant[tenant.name] = run.records
        records = [r for run in runs for r in run.records]
        skipped = sum(run.skipped for run in runs)
        return RunResult(config, records, loop.time() - start, skipped=skipped, workload=workload.describe())
