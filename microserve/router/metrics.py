"""The router's Prometheus metrics (docs/observability.md lists them), in a registry per app; per-worker
state and tallies are read at scrape time, so the hot path only bumps plain integers."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from microserve.lean_metrics import CounterCell, HistogramCell, LeanCounter, LeanHistogram
from microserve.metrics_text import E2E_BUCKETS, TTFT_BUCKETS, render_text
from microserve.router.admission import AdmissionQueue
from microserve.router.breaker import CircuitState
from microserve.router.recent import RecentRequests
from microserve.router.request import Route
from microserve.router.workers import WorkerPool

PREFIX = "microserve_router_"
# The statuses the alert rules and dashboards take ratios of, exported at 0 before the first request.
INITIAL_STATUSES = ("200", "429", "500", "502", "503", "504")


class PoolCollector:
    """Reads the pool, the admission queue and the tallies at scrape time (nothing to keep in step)."""

    def __init__(
        self,
        pool: Callable[[], WorkerPool],
        admission: AdmissionQueue,
        decisions: Tally[tuple[str, str]],
        recent: RecentRequests,
        names: Callable[[], tuple[str, str]],
    ) -> None:
        self._pool = pool
        self._admission = admission
        self._decisions = decisions
        self._recent = recent
        self._names = names

    def collect(self) -> Iterator[Metric]:
        workers = list(self._pool())

        def per_worker(name: str, doc: str, value: Callable[[Any], float]) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["worker"])
            for w in workers:
                family.add_metric([w.url], value(w))
            return family

        info = GaugeMetricFamily(
            PREFIX + "worker_info",
            "Each worker's kind and role (always 1).",
            labels=["worker", "kind", "role"],
        )
        for w in workers:
            info.add_metric([w.url, str(w.kind), str(w.role)], 1)
        yield info
        yield per_worker("worker_requests_in_flight", "Requests in flight per worker.", lambda w: w.in_flight)
        yield per_worker("worker_healthy", "1 if the worker passes its health checks.", lambda w: w.healthy)
        yield per_worker(
            "worker_draining", "1 if the worker is draining (takes no new requests).", lambda w: w.draining
        )
        circuit = GaugeMetricFamily(
            PREFIX + "worker_circuit_state",
            "1 for the state each worker's circuit breaker is in (closed, half_open, open), else 0.",
            labels=["worker", "state"],
        )
        for w in workers:
            current = w.breaker.state
            for state in CircuitState:
                circuit.add_metric([w.url, state.name.lower()], float(state is current))
        yield circuit
        errors = CounterMetricFamily(
            PREFIX + "worker_errors", "Failed attempts per worker, by kind.", labels=["worker", "kind"]
        )
        for w in workers:
            for kind, count in sorted(w.errors.items()):
                errors.add_metric([w.url, kind], count)
        yield errors
        calls = CounterMetricFamily(
            PREFIX + "worker_calls",
            "Calls strategies made on each worker, by verb (generate, prep_recv, remote_send, "
            "start_generate, resume); counted as their request ends.",
            labels=["worker", "verb"],
        )
        for (url, verb), count in sorted(self._recent.calls.items()):
            calls.add_metric([url, verb], count)
        yield calls
        kv_bytes = CounterMetricFamily(
            PREFIX + "kv_transfer_bytes",
            "KV bytes each worker pushed to another (remote_send).",
            labels=["worker"],
        )
        kv_tokens = CounterMetricFamily(
            PREFIX + "kv_transfer_tokens", "Tokens whose KV each worker pushed to another.", labels=["worker"]
        )
        for url, count in sorted(self._recent.kv_bytes.items()):
            kv_bytes.add_metric([url], count)
            kv_tokens.add_metric([url], self._recent.kv_tokens[url])
        yield kv_bytes
        yield kv_tokens
        decisions = CounterMetricFamily(
            PREFIX + "policy_decisions", "Workers picked, by policy.", labels=["policy", "worker"]
        )
        for (policy, url), count in sorted(self._decisions.items()):
            decisions.add_metric([policy, url], count)
        yield decisions
        strategy, policy = self._names()
        for what, name in (("strategy", strategy), ("policy", policy)):
            family = GaugeMetricFamily(
                PREFIX + f"{what}_info", f"The current {what} (always 1).", labels=[what]
            )
            family.add_metric([name], 1)
            yield family
        config = self._admission.config
        for name, doc, value in (
            ("requests_waiting", "Requests waiting for admission.", self._admission.queued),
            ("requests_running", "Requests admitted and not finished.", self._admission.running),
            ("max_queued_requests", "Requests that may wait (--max-queued).", config.max_queued),
            (
                "max_concurrent_requests",
                "Requests that may run at once now (--max-concurrent, or the workers' batch sizes).",
                self._admission.limit,
            ),
            (
                "admission_service_seconds",
                "Mean time a request holds its admission slot (0 until one ended).",
                self._admission.service_s or 0.0,
            ),
            (
                "admission_expected_wait_seconds",
                "Expected wait for a slot of a request arriving now (0 until known).",
                self._admission.expected_wait_s(self._admission.queued) or 0.0,
            ),
        ):
            family = GaugeMetricFamily(PREFIX + name, doc)
            family.add_metric([], value)
            yield family


def scrape_targets(pool: WorkerPool) -> list[dict[str, Any]]:
    """The workers as Prometheus HTTP service discovery targets (`http_sd_configs`), one group each, labelled
    with the router's `worker` URL, `kind` and `role` so that dashboards can join both sides."""
    groups = []
    for w in pool:
        parts = urlsplit(w.url)
        labels = {"worker": w.url, "kind": str(w.kind), "role": str(w.role), "__scheme__": parts.scheme}
        groups.append({"targets": [parts.netloc], "labels": labels})
    return groups


class RouterMetrics:
    def __init__(
        self,
        pool: Callable[[], WorkerPool],
        admission: AdmissionQueue,
        decisions: Tally[tuple[str, str]],
        recent: RecentRequests,
        names: Callable[[], tuple[str, str]],
    ) -> None:
        """`names` gives the current (strategy, policy) names."""
        self.registry = CollectorRegistry()
        reg = self.registry
        reg.register(PoolCollector(pool, admission, decisions, recent, names))
        # What every request updates is counted in plain numbers (lean_metrics.py); the rest by
        # prometheus_client.
        self._requests = LeanCounter(
            PREFIX + "requests", "Requests answered, by route and status.", ["route", "status"]
        )
        # Present at 0 from the start: a series born at its first failure with a count already above 0 has
        # no increase for rate() to see, so the error-ratio alert would miss a burst shorter than a scrape.
        for route in Route:
            for status in INITIAL_STATUSES:
                self._requests.labels(route.value, status)
        self._ttft = LeanHistogram(
            PREFIX + "time_to_first_byte_seconds",
            "Seconds from arrival to the first byte of the answer (first token when streaming).",
            ["route"],
            TTFT_BUCKETS,
        )
        self._e2e = LeanHistogram(
            PREFIX + "e2e_request_latency_seconds",
            "Seconds from arrival to the end of the answer.",
            ["route"],
            E2E_BUCKETS,
        )
        queue_wait = LeanHistogram(
            PREFIX + "queue_wait_seconds",
            "Seconds a request waited for admission (held while no engine was ready: a scale from zero).",
            [],
            E2E_BUCKETS,
        )
        for family in (self._requests, self._ttft, self._e2e, queue_wait):
            reg.register(family)
        self.queue_wait: HistogramCell = queue_wait.labels()
        self.retries = Counter(PREFIX + "retries", "Attempts retried on another worker.", registry=reg)
        self.continuations = Counter(
            PREFIX + "stream_continuations",
            "Streams continued on another engine after theirs failed mid-stream.",
            ["outcome"],
            registry=reg,
        )
        for outcome in ("completed", "gave_up", "no_worker"):  # present at 0, so rates and alerts see them
            self.continuations.labels(outcome)
        self.retry_budget_exhausted = Counter(
            PREFIX + "retry_budget_exhausted", "Retries refused by the retry budget.", registry=reg
        )
        # Label lookups cost microseconds on the hot path: each cell is resolved once.
        self._counts: dict[tuple[str, int], CounterCell] = {}
        self._ttft_cells: dict[str, HistogramCell] = {}
        self._e2e_cells: dict[str, HistogramCell] = {}

    def first_byte(self, route: str, seconds: float) -> None:
        cell = self._ttft_cells.get(route)
        if cell is None:
            cell = self._ttft_cells[route] = self._ttft.labels(route)
        cell.observe(seconds)

    def request_done(self, route: str, status: int, e2e_s: float | None) -> None:
        """Count the request by status; its latency only if an answer was sent (`e2e_s` not None)."""
        count = self._counts.get((route, status))
        if count is None:
            count = self._counts[(route, status)] = self._requests.labels(route, str(status))
        count.inc()
        if e2e_s is not None:
            cell = self._e2e_cells.get(route)
            if cell is None:
                cell = self._e2e_cells[route] = self._e2e.labels(route)
            cell.observe(e2e_s)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Text format 0.0.4, as the engines answer (`render_text` says why nothing is negotiated)."""
        return render_text(self.registry)
