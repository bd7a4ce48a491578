"""The gateway's Prometheus metrics, read at scrape time: requests refused by reason (a bad key, a model
the key may not use, each limit), response-cache and semantic-cache lookups by result."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from microserve.tenants.cache import ResponseCache
from microserve.tenants.gateway import Gateway
from microserve.tenants.semantic import SemanticCache

PREFIX = "microserve_router_"
# Every reason is exported from the start, at 0: a series born at its first refusal with a count already
# above 0 has no increase for rate() to see (a dashboard would miss a burst shorter than a scrape).
REASONS = ("invalid_api_key", "model_not_allowed", "rpm", "tpm", "daily_tokens", "max_concurrent")


class TenantsCollector:
    def __init__(
        self, gateway: Gateway | None, cache: ResponseCache | None, semantic: SemanticCache | None = None
    ) -> None:
        self._gateway = gateway
        self._cache = cache
        self._semantic = semantic

    def collect(self) -> Iterator[Metric]:
        if self._gateway is not None:
            refused = CounterMetricFamily(
                PREFIX + "tenant_refusals",
                "Requests refused by the key gateway, by reason (invalid_api_key, model_not_allowed, rpm, "
                "tpm, daily_tokens, max_concurrent).",
                labels=["reason"],
            )
            counts = dict.fromkeys(REASONS, 0)
            counts.update(self._gateway.refusals())
            for reason, count in counts.items():
                refused.add_metric([reason], count)
            yield refused
        if self._cache is not None:
            lookups = CounterMetricFamily(
                PREFIX + "response_cache_lookups",
                "Response-cache lookups of cacheable requests, by result (hit, miss).",
                labels=["result"],
            )
            lookups.add_metric(["hit"], self._cache.hits)
            lookups.add_metric(["miss"], self._cache.misses)
            yield lookups
        if self._semantic is not None:
            semantic = CounterMetricFamily(
                PREFIX + "semantic_cache_lookups",
                "Semantic-cache lookups of cacheable requests the exact cache missed, by result (hit, miss, "
                "error: no embedding, answered as a miss).",
                labels=["result"],
            )
            semantic.add_metric(["hit"], self._semantic.hits)
            semantic.add_metric(["miss"], self._semantic.misses)
            semantic.add_metric(["error"], self._semantic.errors)
            yield semantic
