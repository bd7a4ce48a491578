"""What the engine's and the router's `/metrics` share: vLLM's latency buckets and the text exposition.

Bucket bounds follow vLLM's, so dashboards and SLO queries written for vLLM carry over unchanged.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

# The text format would carry each counter's and histogram's `_created` time as a series of its own, which
# no dashboard uses (a process-wide switch of prometheus_client, read at scrape time).
disable_created_metrics()

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


def render_text(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus' text format 0.0.4, whatever the scraper accepts. Negotiating OpenMetrics
    would rename `vllm:*` to `vllm_*` (prometheus_client escapes colons there), and a real Prometheus asks
    for OpenMetrics first: its series would no longer carry the names gateways and dashboards use."""
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
