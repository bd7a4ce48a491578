"""The router's observability pieces without a browser: the recent-request ring, the window summary the
/dashboard page shows, the page's routes and state over fake workers, the metric names (public: pinned
here), the Prometheus service-discovery targets, and the engines' names surviving an OpenMetrics scrape."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from microserve.router.config import RouterConfig
from microserve.router.dashboard import BIN_S, percentile, summarize
from microserve.router.metrics import scrape_targets
from microserve.router.recent import Finished, Hop, RecentRequests, plain_hop, usage_of, usage_tokens
from microserve.router.request import Route, RoutedRequest
from microserve.router.router import Router
from microserve.router.workers import Role, WorkerKind, WorkerPool, WorkerSpec
from microserve.server.metrics import ServerMetrics
from tests.clocks import Clock
from tests.router_fakes import fakes, serving

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

ROUTER_METRICS = {
    # name as exposed: type
    "microserve_router_requests_total": "counter",
    "microserve_router_time_to_first_byte_seconds": "histogram",
    "microserve_router_e2e_request_latency_seconds": "histogram",
    "microserve_router_retries_total": "counter",
    "microserve_router_retry_budget_exhausted_total": "counter",
    "microserve_router_stream_continuations_total": "counter",
    "microserve_router_shared_state_up": "gauge",
    "microserve_router_shared_state_mode": "gauge",
    "microserve_router_shared_state_replicas": "gauge",
    "microserve_router_requests_running": "gauge",
    "microserve_router_requests_waiting": "gauge",
    "microserve_router_max_concurrent_requests": "gauge",
    "microserve_router_max_queued_requests": "gauge",
    "microserve_router_admission_service_seconds": "gauge",
    "microserve_router_admission_expected_wait_seconds": "gauge",
    "microserve_router_queue_wait_seconds": "histogram",
    "microserve_router_strategy_info": "gauge",
    "microserve_router_policy_info": "gauge",
    "microserve_router_worker_info": "gauge",
    "microserve_router_worker_requests_in_flight": "gauge",
    "microserve_router_worker_healthy": "gauge",
    "microserve_router_worker_draining": "gauge",
    "microserve_router_worker_circuit_state": "gauge",
    "microserve_router_worker_errors_total": "counter",
    "microserve_router_worker_calls_total": "counter",
    "microserve_router_kv_transfer_bytes_total": "counter",
    "microserve_router_kv_transfer_tokens_total": "counter",
    "microserve_router_policy_decisions_total": "counter",
}


def add(ring: RecentRequests, status: int = 200, ttft: float | None = 0.1, e2e: float = 1.0, **kw) -> None:
    ring.record("/v1/chat/completions", "m", "pd", status, True, ttft, e2e, **kw)


def test_the_ring_keeps_the_newest_requests_and_tallies_their_calls() -> None:
    clock = Clock(1000.0)
    ring = RecentRequests(size=3, clock=clock)
    assert ring.complete_since() == -math.inf
    for i in range(5):
        clock.now = 1000.0 + i
        hops = [Hop("prep_recv", "http://d", 10), Hop("remote_send", "http://p", 30, 4096)]
        add(ring, hops=hops, output_tokens=i)
    assert len(ring) == 3
    assert [f.output_tokens for f in ring.latest(2)] == [4, 3]
    assert [f.seq for f in ring.window(1.5)] == [4, 5]  # ended at 1003 and 1004; now is 1004
    assert ring.complete_since() == 1002.0  # requests 1 and 2 were dropped
    assert ring.calls == {("http://d", "prep_recv"): 5, ("http://p", "remote_send"): 5}
    assert ring.kv_bytes == {"http://p": 5 * 4096} and ring.kv_tokens == {"http://p": 150}
    with pytest.raises(ValueError):
        RecentRequests(size=0)


def test_tpot_needs_a_stream_with_counted_tokens() -> None:
    ring = RecentRequests()
    add(ring, ttft=0.5, e2e=2.5, output_tokens=5)
    add(ring, ttft=0.5, e2e=2.5, output_tokens=1)
    add(ring, ttft=0.5, e2e=2.5, output_tokens=None)
    ring.record("/v1/completions", "m", "pd", 200, False, 0.5, 2.5, 5)
    assert [f.tpot_s for f in ring.latest(4)] == [None, None, None, 0.5]


def test_usage_is_read_from_a_whole_answer_without_parsing_it() -> None:
    body = (
        b'{"choices":[{"message":{"content":"say \\"completion_tokens\\": 99"}}],'
        b'"usage":{"prompt_tokens":7,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4}}}'
    )
    assert usage_tokens(body) == (3, 4)
    assert usage_tokens(b'{"usage":{"completion_tokens": 2}}') == (2, None)
    assert usage_tokens(b'{"choices":[]}') == (None, None)


def test_a_whole_answers_usage_is_kept_unparsed_and_read_when_the_request_is() -> None:
    body = b'{"choices":[],"usage":{"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":2}}}'
    ring = RecentRequests()
    ring.record("/v1/chat/completions", "m", "dp", 200, False, 0.1, 0.2, usage=usage_of(body))
    ring.record("/v1/chat/completions", "m", "dp", 200, True, 0.1, 0.2, output_tokens=3, cached_tokens=1)
    ring.record("/v1/chat/completions", "m", "dp", 200, False, 0.1, 0.2, usage=usage_of(b'{"choices":[]}'))
    assert usage_of(b'{"choices":[]}') is None
    assert [(f.output_tokens, f.cached_tokens) for f in ring.window(60.0)] == [(5, 2), (3, 1), (None, None)]
    req = RoutedRequest.parse(Route.CHAT, b'{"messages":[{"role":"user","content":"Hi."}]}')
    assert req.token_counts() == (None, None)
    req.usage = usage_of(body)
    assert req.token_counts() == (5, 2)


def test_the_ring_shares_what_it_can_instead_of_keeping_each_requests_own() -> None:
    ring, route = RecentRequests(size=4, clock=Clock(50.0)), "/v1/chat/completions"
    model = "".join(["smol", "lm"])  # a string of its own, as each parsed request's is
    chat = b'{"messages":[{"role":"user","content":"Hi."}]}'
    first, second = (RoutedRequest.parse(Route.CHAT, chat) for _ in range(2))
    first.note("generate", "http://a")
    second.note("generate", "http://a")
    generate = first.hops[0]
    assert second.hops[0] is generate is plain_hop("generate", "http://a")  # one object for all
    ring.record(route, model, "dp", 200, False, 0.25, 0.5, 7, 3, first.hops)
    ring.record(route, "".join(["smol", "lm"]), "pd", 502, True, None, 1.5)
    kv = (Hop("prep_recv", "http://d", 10), Hop("remote_send", "http://p", 30, 4096))
    ring.record(route, None, "pd", 200, True, 0.125, 2.0, 40, None, list(kv))
    whole, failed, moved = ring.window(60.0)
    assert whole == Finished(1, 50.0, route, "smollm", "dp", 200, False, 0.25, 0.5, 7, 3, (generate,))
    assert (failed.seq, failed.ttft_s, failed.hops, moved.hops, moved.output_tokens) == (2, None, (), kv, 40)
    assert whole.model is model and failed.model is model  # the later request's equal name is not kept
    assert whole.hops[0] is generate
    for _ in range(5):  # around the ring: the newest four, each with its number
        ring.record(route, "m", "dp", 200, False, 0.1, 0.2)
    assert [f.seq for f in ring.window(60.0)] == [5, 6, 7, 8] and [f.seq for f in ring.latest(2)] == [8, 7]
    assert ring.complete_since() == 50.0


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def test_the_summary_counts_the_window_in_bins() -> None:
    clock = Clock(0.0)
    ring = RecentRequests(clock=clock)
    for i in range(30):  # one request a second for 30 s; every tenth fails
        clock.now = 1000.0 + i
        add(ring, status=500 if i % 10 == 9 else 200, ttft=None if i % 10 == 9 else 0.01 * (i + 1))
    summary = summarize(ring.window(20, now=1030.0), 1030.0, 20.0, since=900.0)
    assert summary["span_s"] == 20.0
    assert summary["requests"] == 20  # ended at 1010..1029
    assert summary["rate_per_s"] == 1.0
    assert summary["errors"] == 2 and summary["error_ratio"] == 0.1
    assert [b["requests"] for b in summary["bins"]] == [10, 10]
    assert summary["bins"][0]["ttft_p50_s"] == pytest.approx(0.15)
    assert summary["bin_s"] == BIN_S
    # The router started 5 s ago: the figures reach back 5 s, not the whole window.
    young = summarize(ring.window(300, now=1030.0), 1030.0, 300.0, since=1025.0)
    assert young["span_s"] == 5.0 and young["requests"] == 5 and len(young["bins"]) == 1


def test_the_workers_are_prometheus_targets_with_the_routers_labels() -> None:
    pool = WorkerPool()
    pool.add(WorkerSpec("http://10.0.0.1:8001", role=Role.PREFILL))
    pool.add(WorkerSpec("https://gpu-box:443", kind=WorkerKind.OPENAI))
    assert scrape_targets(pool) == [
        {
            "targets": ["10.0.0.1:8001"],
            "labels": {
                "worker": "http://10.0.0.1:8001",
                "kind": "microserve",
                "role": "prefill",
                "__scheme__": "http",
            },
        },
        {
            "targets": ["gpu-box:443"],
            "labels": {
                "worker": "https://gpu-box:443",
                "kind": "openai",
                "role": "both",
                "__scheme__": "https",
            },
        },
    ]


def test_the_engines_vllm_names_survive_a_scrape_that_asks_for_openmetrics() -> None:
    load = {
        "waiting": 1,
        "running": 2,
        "kv_usage": 0.5,
        "block_size": 16,
        "kv_blocks_total": 8,
        "prefix_cache_queries": 3,
        "prefix_cache_hits": 1,
    }
    metrics = ServerMetrics(lambda: load, "m")
    body, content_type = metrics.render("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b'vllm:num_requests_waiting{model_name="m"} 1.0' in body
    assert b"vllm_" not in body


async def test_the_metrics_are_named_by_prometheus_rules_and_pinned() -> None:
    async with fakes(1) as servers:
        router = Router(RouterConfig(workers=[WorkerSpec(servers[0].url, kind=WorkerKind.OPENAI)]))
        async with serving(router) as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
            resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
            text = (await resp.read()).decode()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    exposed = {(n + "_total" if t == "counter" else n): t for n, t in families.items()}
    assert exposed == ROUTER_METRICS
    for name, kind in exposed.items():
        assert name.startswith("microserve_router_")
        assert name.endswith("_total") == (kind == "counter")
    assert 'microserve_router_stream_continuations_total{outcome="gave_up"} 0.0' in text
    assert 'microserve_router_strategy_info{strategy="data_parallel"} 1.0' in text


async def test_the_dashboard_page_and_its_state() -> None:
    async with fakes(2) as servers:
        workers = [WorkerSpec(s.url, kind=WorkerKind.OPENAI) for s in servers]
        router = Router(RouterConfig(workers=workers, admin_token="t"))
        async with serving(router) as client:
            page = await client.get("/dashboard")
            assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
            html = await page.text()
            for asset in ("/dashboard/dashboard.js", "/dashboard/dashboard.css"):
                assert asset in html
                assert (await client.get(asset)).status == 200
            for i in range(3):
                body = {**CHAT, "stream": i == 0}
                assert (await client.post("/v1/chat/completions", json=body)).status == 200
            state = await (await client.get("/dashboard/state?window=60")).json()
            assert (await client.get("/dashboard/state?window=x")).status == 400
    assert state["admin"] is True
    assert state["strategy"] == {"name": "data_parallel", "options": {}}
    assert "pd_balanced" in state["strategies"] and "prefix_aware" in state["policies"]
    assert [w["url"] for w in state["workers"]] == [s.url for s in servers]
    assert sum(w["requests"] for w in state["workers"]) == 3
    assert state["traffic"]["requests"] == 3 and state["traffic"]["errors"] == 0
    recent = state["recent"]
    assert [r["seq"] for r in recent] == [3, 2, 1]
    assert [r["stream"] for r in recent] == [False, False, True]
    assert all(r["status"] == 200 and len(r["hops"]) == 1 for r in recent)
    assert recent[0]["hops"][0] == {"verb": "generate", "worker": servers[0].url}  # round robin
    assert recent[0]["output_tokens"] == 4  # read from the whole answer's usage
