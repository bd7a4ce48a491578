"""Drive one benchmark run: arrivals, max concurrency, and a request count or a duration, with a live bar.

Bounded by construction: it stops issuing at the count or the deadline, and every request has a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from microserve.bench.arrivals import ArrivalKind, check_arrival, default_kind, interarrival_gaps
from microserve.bench.issuer import issue_requests
from microserve.bench.sender import RequestRecord, Target, send
from microserve.bench.workloads import BenchRequest, Workload


@dataclass(frozen=True, slots=True)
class RunConfig:
    """The load of one run. Exactly one of `num_requests` and `duration_s` ends it."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    arrival: ArrivalKind | None = None  # None: Poisson at burstiness 1, else gamma (vLLM's convention)
    max_concurrency: int | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arrival is None:
            object.__setattr__(self, "arrival", default_kind(self.burstiness))
        check_arrival(self.kind, self.request_rate, self.burstiness)
        if (self.num_requests is None) == (self.duration_s is None):
            raise ValueError("a run needs exactly one of a request count and a duration")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"--num-requests must be positive, got {self.num_requests}")
        if self.duration_s is not None and not 0 < self.duration_s < math.inf:
            raise ValueError(f"--duration must be a positive number of seconds, got {self.duration_s}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be positive, got {self.max_concurrency}")
        if self.duration_s is not None and math.isinf(self.request_rate) and self.max_concurrency is None:
            # Infinitely many requests at once for a whole duration has no bound at all.
            raise ValueError("--request-rate inf with --duration needs --max-concurrency")

    @property
    def kind(self) -> ArrivalKind:
        assert self.arrival is not None
        return self.arrival

    def describe(self) -> dict[str, object]:
        return {
            "request_rate": "inf" if math.isinf(self.request_rate) else self.request_rate,
            "arrival": self.kind.value,
            "burstiness": self.burstiness,
            "max_concurrency": self.max_concurrency,
            "num_requests": self.num_requests,
            "duration_s": self.duration_s,
            "seed": self.seed,
        }


@dataclass(slots=True)
class RunResult:
    config: RunConfig
    records: list[RequestRecord]
    duration_s: float
    skipped: int = 0
    workload: dict[str, Any] = field(default_factory=dict)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


class RunObserver(Protocol):
    """Told about a run as it goes (the live progress bar is one)."""

    def sent(self, request: BenchRequest) -> None: ...

    def finished(self, record: RequestRecord) -> None: ...

    def tick(self, elapsed_s: float) -> None: ...


async def run_benchmark(
    target: Target,
    workload: Workload,
    config: RunConfig,
    observer: RunObserver | None = None,
) -> RunResult:
    """Send the workload's requests at the configured arrivals and return every request's record."""
    workload.check_endpoint(target.endpoint)
    source = workload.source(config.num_requests)
    gaps = interarrival_gaps(config.kind, config.request_rate, config.burstiness, config.seed)

    async def ticker(observer: RunObserver, start: float) -> None:
        while True:
            observer.tick(time.perf_counter() - start)
            await asyncio.sleep(0.25)

    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send_one(request: BenchRequest, record: RequestRecord) -> str | None:
            await send(session, target, record)
            return record.text if record.success else None

        start = time.perf_counter()
        tick_task = asyncio.create_task(ticker(observer, start)) if observer else None
        try:
            records = await issue_requests(
                source,
                gaps,
                send_one,
                time.perf_counter,
                request_rate=config.request_rate,
                max_concurrency=config.max_concurrency,
                duration_s=config.duration_s,
                observer=observer,
            )
        finally:
            if tick_task:
                tick_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tick_task
        duration = time.perf_counter() - start
    return RunResult(config, records, duration, skipped=source.skipped, workload=workload.describe())


class LiveProgress:
    """A rich progress bar for one run: requests done of the count (or seconds of the duration), in flight,
    failed. Rich draws it only on a terminal, so logs and tests get no control codes."""

    def __init__(self, label: str, config: RunConfig, console: Console | None = None) -> None:
        self.config = config
        self.in_flight = 0
        self.done = 0
        self.failed = 0
        self._by_time = config.duration_s is not None
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TextColumn("in flight {task.fields[in_flight]:>3}  failed {task.fields[failed]}"),
            TimeElapsedColumn(),
        ]
        if not self._by_time:
            columns[2] = MofNCompleteColumn()
        self.progress = Progress(*columns, console=console or Console(stderr=True), transient=False)
        total = config.duration_s if self._by_time else config.num_requests
        self.task = self.progress.add_task(label, total=total, count="", in_flight=0, failed=0)

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._by_time and exc[0] is None:
            self.progress.update(self.task, completed=self.config.duration_s)
        self.progress.stop()

    def _refresh(self) -> None:
        self.progress.update(
            self.task,
            completed=None if self._by_time else self.done,  # None: rich leaves it as it is
            in_flight=self.in_flight,
            failed=self.failed,
            count=f"{self.done} done",
        )

    def sent(self, request: BenchRequest) -> None:
        self.in_flight += 1
        self._refresh()

    def finished(self, record: RequestRecord) -> None:
        self.in_flight -= 1
        self.done += 1
        self.failed += not record.success
        self._refresh()

    def tick(self, elapsed_s: float) -> None:
        if self._by_time:
            self.progress.update(self.task, completed=min(elapsed_s, self.config.duration_s or 0.0))


def sweep_configs(base: RunConfig, rates: list[float]) -> Iterator[RunConfig]:
    """One run per request rate, all else equal; the arrival seed too, so each rate scales one pattern.

    The prompts are not equal: `Workload.for_run` gives each run fresh ones (see there)."""
    for rate in rates:
        yield replace(base, request_rate=rate)
