"""Prometheus metrics of one engine server, under the names vLLM uses so that inference gateways read them.

Load gauges and prefix-cache counters are read from `engine.load()` at scrape time; latencies and token
counts are observed per request by the HTTP layer as it streams.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from microserve.engine.outputs import RequestOutput
from microserve.metrics_text import E2E_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, render_text

# The names below are the ones the Gateway API Inference Extension's model-server protocol reads from vLLM
# (docs/proposals/003-model-server-protocol): num_requests_waiting, num_requests_running,
# kv_cache_usage_perc and cache_config_info{block_size, num_gpu_blocks}. gpu_cache_usage_perc is the
# pre-v0.10 name of kv_cache_usage_perc, still read by older gateways.
_LABELS = ["model_name"]


class EngineLoadCollector:
    """Reads `engine.load()` once per scrape, so gauges are never stale and cost nothing between scrapes."""

    def __init__(self, load: Callable[[], dict[str, Any]], model_name: str) -> None:
        self._load = load
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        load = self._load()
        labels = [self._model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=_LABELS)
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=_LABELS)
            family.add_metric(labels, value)
            return family

        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", load["waiting"]
        )
        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", load["running"]
        )
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", load["kv_usage"]
        )
        yield gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (pre-v0.10 name).", load["kv_usage"])
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the KV cache configuration.",
            labels=[*_LABELS, "block_size", "num_gpu_blocks"],
        )
        info.add_metric([self._model_name, str(load["block_size"]), str(load["kv_blocks_total"])], 1.0)
        yield info
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            load["prefix_cache_queries"],
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            load["prefix_cache_hits"],
        )


class ServerMetrics:
    """One registry per app, so two servers in one process (or one test after another) never share state."""

    def __init__(self, load: Callable[[], dict[str, Any]], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineLoadCollector(load, model_name))
        reg = self.registry
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            _LABELS,
            buckets=TTFT_BUCKETS,
            registry=reg,
        ).labels(model_name)
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds (per request: decode time / (tokens - 1)).",
            _LABELS,
            buckets=TPOT_BUCKETS,
            registry=reg,
        ).labels(model_name)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            _LABELS,
            buckets=E2E_BUCKETS,
            registry=reg,
        ).labels(model_name)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", _LABELS, registry=reg
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", _LABELS, registry=reg
        ).labels(model_name)
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*_LABELS, "finished_reason"],
            registry=reg,
        )
        self._model_name = model_name

    def request_finished(self, reason: str) -> None:
        self._success.labels(self._model_name, reason).inc()

    def start_request(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type (`accept` is not negotiated: see `render_text`)."""
        return render_text(self.registry)


class RequestTimer:
    """Observes one request's outputs as they are sent: TTFT, tokens as they come, TPOT and e2e at the end."""

    __slots__ = ("_completion_tokens", "_done", "_first", "_metrics", "_start")

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._start = time.perf_counter()
        self._first: float | None = None
        self._completion_tokens = 0
        self._done = False

    def observe(self, output: RequestOutput) -> None:
        new_tokens = len(output.token_ids)  # the choices of n > 1 (or a batch of prompts) interleave
        if new_tokens <= 0:
            return
        if self._first is None:
            self._first = time.perf_counter()
            self._metrics.ttft.observe(self._first - self._start)
            # Counted once prefill is done, as vLLM does, not on arrival of a request that may be refused.
            self._metrics.prompt_tokens.inc(output.prompt_tokens)
        self._metrics.generation_tokens.inc(new_tokens)
        self._completion_tokens += new_tokens

    def finish(self, reason: str) -> None:
        """Record the end of the request; `reason` is its finish_reason, "abort" when the client left."""
        if self._done:
            return
        self._done = True
        now = time.perf_counter()
        self._metrics.e2e.observe(now - self._start)
        if self._first is not None and self._completion_tokens > 1:
            self._metrics.tpot.observe((now - self._first) / (self._completion_tokens - 1))
        self._metrics.request_finished(reason)
