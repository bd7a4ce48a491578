"""The router's Prometheus metrics, in a registry of its own per app (two routers never share state).

Per-request series are observed as requests end; per-worker state (in flight, circuit, health, errors,
policy decisions) is read from the pool at scrape time, so the hot path only bumps plain integers.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from microserve.router.admission import AdmissionQueue
from microserve.router.workers import WorkerPool
from microserve.server.metrics import E2E_BUCKETS, TTFT_BUCKETS

PREFIX = "microserve_router_"


class PoolCollector:
    def __init__(
        self, pool: Callable[[], WorkerPool], admission: AdmissionQueue, decisions: Tally[tuple[str, str]]
    ) -> None:
        self._pool = pool
        self._admission = admission
        self._decisions = decisions

    def collect(self) -> Iterator[Metric]:
        workers = list(self._pool())

        def per_worker(name: str, doc: str, value: Callable[[Any], float]) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["worker"])
            for w in workers:
                family.add_metric([w.url], value(w))
            return family

        yield per_worker("worker_in_flight", "Requests in flight per worker.", lambda w: w.in_flight)
        yield per_worker(
            "worker_circuit_state",
            "Circuit breaker state per worker: 0 closed, 1 half-open, 2 open.",
            lambda w: int(w.breaker.state),
        )
        yield per_worker("worker_healthy", "1 if the worker passes its health checks.", lambda w: w.healthy)
        errors = CounterMetricFamily(
            PREFIX + "worker_errors", "Failed attempts per worker, by kind.", labels=["worker", "kind"]
        )
        for w in workers:
            for kind, count in sorted(w.errors.items()):
                errors.add_metric([w.url, kind], count)
        yield errors
        decisions = CounterMetricFamily(
            PREFIX + "policy_decisions", "Workers picked, by policy.", labels=["policy", "worker"]
        )
        for (policy, url), count in sorted(self._decisions.items()):
            decisions.add_metric([policy, url], count)
        yield decisions
        queue = GaugeMetricFamily(PREFIX + "queue_depth", "Requests waiting for admission.")
        queue.add_metric([], self._admission.queued)
        yield queue
        running = GaugeMetricFamily(PREFIX + "requests_running", "Requests admitted and not finished.")
        running.add_metric([], self._admission.running)
        yield running


class RouterMetrics:
    def __init__(
        self, pool: Callable[[], WorkerPool], admission: AdmissionQueue, decisions: Tally[tuple[str, str]]
    ) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        reg.register(PoolCollector(pool, admission, decisions))
        self._requests = Counter(
            PREFIX + "requests", "Requests answered, by route and status.", ["route", "status"], registry=reg
        )
        self._ttft = Histogram(
            PREFIX + "time_to_first_byte_seconds",
            "Seconds from arrival to the first byte of the answer (first token when streaming).",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self._e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Seconds from arrival to the end of the answer.",
            ["route"],
            buckets=E2E_BUCKETS,
            registry=reg,
        )
        self.retries = Counter(PREFIX + "retries", "Attempts retried on another worker.", registry=reg)
        self.continuations = Counter(
            PREFIX + "stream_continuations",
            "Streams continued on another engine after theirs failed mid-stream.",
            ["outcome"],
            registry=reg,
        )
        self.retry_budget_exhausted = Counter(
            PREFIX + "retry_budget_exhausted", "Retries refused by the retry budget.", registry=reg
        )
        # Label lookups cost microseconds on the hot path: each child is resolved once.
        self._children: dict[tuple[str, str], Any] = {}
        self._ttft_children: dict[str, Any] = {}
        self._e2e_children: dict[str, Any] = {}

    def first_byte(self, route: str, seconds: float) -> None:
        child = self._ttft_children.get(route)
        if child is None:
            child = self._ttft_children[route] = self._ttft.labels(route)
        child.observe(seconds)

    def request_done(self, route: str, status: int, e2e_s: float | None) -> None:
        """Count the request by status; its latency only if an answer was sent (`e2e_s` not None)."""
        key = (route, str(status))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._requests.labels(*key)
        child.inc()
        if e2e_s is not None:
            e2e = self._e2e_children.get(route)
            if e2e is None:
                e2e = self._e2e_children[route] = self._e2e.labels(route)
            e2e.observe(e2e_s)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
