"""Active health checks and load polling: a background task asks every worker whether it is ready (and
which models it serves), and, while the policy wants it, how loaded it is (/load, or /metrics elsewhere)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

from microserve.http.client import ClientError
from microserve.router.tasks import cancel_all
from microserve.router.upstream import Upstream
from microserve.router.workers import Worker, WorkerKind, WorkerPool

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class HealthConfig:
    interval_s: float = 2.0
    timeout_s: float = 2.0
    unhealthy_after: int = 2  # failed checks in a row
    healthy_after: int = 1  # passed checks in a row
    load_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if min(self.interval_s, self.timeout_s, self.load_interval_s) <= 0:
            raise ValueError("health intervals and timeouts must be positive")
        if self.unhealthy_after < 1 or self.healthy_after < 1:
            raise ValueError("unhealthy_after and healthy_after must be at least 1")


# Load gauges other servers export: vLLM (also what Kubernetes inference gateways read) and SGLang.
_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")


def parse_prometheus_load(text: str) -> tuple[int, int, float] | None:
    """(waiting, running, kv_usage) from Prometheus text, summed over label sets; None if not exported."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        name = line[:name_end]
        if name in _WAITING or name in _RUNNING or name in _KV:
            try:
                rest = line[line.index("}", name_end) + 1 :] if line[name_end] == "{" else line[name_end:]
                value = float(rest.split()[0])
            except (IndexError, ValueError):
                continue
            sums[name] = sums.get(name, 0.0) + value

    def first(names: tuple[str, ...]) -> float | None:
        return next((sums[n] for n in names if n in sums), None)

    waiting, running, kv = first(_WAITING), first(_RUNNING), first(_KV)
    if waiting is None and running is None:
        return None
    return int(waiting or 0), int(running or 0), float(kv or 0.0)


class HealthChecker:
    """Runs the checks for one pool; `probe` checks one worker at once (on add, at start)."""

    def __init__(
        self,
        pool: WorkerPool,
        upstream: Upstream,
        config: HealthConfig,
        wants_load: Callable[[], bool],
        on_checked: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.on_checked = on_checked  # after each round of checks (admission re-reads its capacity)
        self.upstream = upstream
        self.config = config
        self.wants_load = wants_load
        self._streaks: dict[str, int] = {}  # >0 passes in a row, <0 failures in a row
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._every(self.config.interval_s, self.check_all), name="router-health"),
            asyncio.create_task(
                self._every(self.config.load_interval_s, self.poll_loads), name="router-load"
            ),
        ]

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        self._tasks = []

    async def _every(self, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:  # a bug here must not end health checking for good
                log.exception("router: background check failed")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.probe(w) for w in self.pool))
        if not self.wants_load():
            # Engines' step times and batch sizes (deadlines, admission) are needed by every policy:
            # without the policy's faster polling, they are read once per health check.
            await asyncio.gather(
                *(self.poll_load(w) for w in self.pool if w.healthy and w.kind is WorkerKind.MICROSERVE)
            )
        if self.on_checked is not None:
            self.on_checked()

    async def first_check(self, worker: Worker) -> bool:
        """A new worker is healthy once it passes one check; one that fails it starts out unhealthy."""
        ok = await self.probe(worker)
        worker.healthy = ok
        if ok and worker.kind is WorkerKind.MICROSERVE:
            await self.poll_load(worker)  # its step time and batch size, before the first request
        return ok

    async def probe(self, worker: Worker) -> bool:
        """One check: ready (and models known) or not; flips `healthy` after enough in a row."""
        ok = await self._check(worker)
        streak = self._streaks.get(worker.url, 0)
        streak = max(streak, 0) + 1 if ok else min(streak, 0) - 1
        self._streaks[worker.url] = streak
        if ok and not worker.healthy and streak >= self.config.healthy_after:
            log.info("router: worker %s is healthy", worker.url)
            worker.healthy = True
        elif not ok and worker.healthy and -streak >= self.config.unhealthy_after:
            log.warning("router: worker %s failed %d health checks; taking it out", worker.url, -streak)
            worker.healthy = False
        return ok

    async def _get(self, worker: Worker, path: str) -> tuple[int, bytes]:
        headers = self.upstream.headers_for(worker)
        return await self.upstream.control.fetch(
            "GET", worker.url, path, headers=headers, timeout_s=self.config.timeout_s
        )

    async def _check(self, worker: Worker) -> bool:
        try:
            if worker.kind is WorkerKind.MICROSERVE:
                status, _ = await self._get(worker, "/ready")
                if status != 200:
                    return False
                if worker.models:
                    return True  # an engine serves one fixed model: ask for it once
            # OpenAI-compatible servers all have /v1/models; it is also where their models come from.
            status, body = await self._get(worker, "/v1/models")
            if status != 200:
                return False
            data = orjson.loads(body)["data"]
            if not worker.spec.models:
                worker.models = {m["id"] for m in data}
            # What the router's /v1/models repeats of each (max_model_len, root), as vLLM's list has it.
            worker.model_cards = {m["id"]: m for m in data if isinstance(m, dict) and "id" in m}
            return True
        except (ClientError, TimeoutError, orjson.JSONDecodeError, KeyError, TypeError):
            return False

    async def poll_loads(self) -> None:
        if self.wants_load():
            await asyncio.gather(*(self.poll_load(w) for w in self.pool if w.healthy))

    async def poll_load(self, worker: Worker) -> None:
        try:
            if worker.kind is WorkerKind.MICROSERVE:
                status, body = await self._get(worker, "/load")
                if status == 200:
                    load = orjson.loads(body)
                    hit_rate, step_s = load.get("prefix_hit_rate"), load.get("step_s")
                    seqs = load.get("max_num_seqs")
                    worker.report_load(
                        int(load["waiting"]),
                        int(load["running"]),
                        float(load["kv_usage"]),
                        prefix_hit_rate=None if hit_rate is None else float(hit_rate),
                        step_s=None if step_s is None else float(step_s),
                        max_num_seqs=None if seqs is None else int(seqs),
                    )
                return
            status, body = await self._get(worker, "/metrics")
            parsed = parse_prometheus_load(body.decode(errors="replace")) if status == 200 else None
            if parsed is not None:
                worker.report_load(*parsed, at=time.monotonic())
        except (ClientError, TimeoutError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            pass  # the report goes stale, and policies fall back to in-flight counts
