"""The router's spans over loopback in front of fake workers, kept in memory: a client's traceparent
continued, each attempt and retry, a continuation after a broken stream, the trace context sent to
workers, and nothing sent (nor any span made) with tracing off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from microserve.router.admission import AdmissionConfig
from microserve.router.config import RouterConfig
from microserve.router.retry import RetryConfig
from microserve.router.router import Router
from microserve.router.workers import WorkerKind, WorkerSpec
from microserve.tracing import Tracing
from tests.router_fakes import FakeOpenAI, RouterClient, fakes, serving

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@asynccontextmanager
async def traced(
    servers: list[FakeOpenAI], kind: WorkerKind = WorkerKind.OPENAI, **settings: Any
) -> AsyncIterator[tuple[RouterClient, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    workers = [WorkerSpec(s.url, kind=kind) for s in servers]
    router = Router(
        RouterConfig(workers=workers, policy="round_robin", **settings), tracing=Tracing(provider)
    )
    async with serving(router) as client:
        yield client, exporter


def spans(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        by_name.setdefault(span.name, []).append(span)
    return by_name


def parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, f"{span.name} has no parent"
    return span.parent.span_id


def sent_traceparent(server: FakeOpenAI, call: int = 0) -> str:
    headers = {k.lower(): v for k, v in server.calls[call][2].items()}
    return headers["traceparent"]


async def test_a_retry_is_a_second_attempt_span_and_each_call_carries_its_own_context() -> None:
    async with fakes(2) as servers, traced(servers) as (client, exporter):
        servers[0].statuses = [500]
        resp = await client.post("/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT})
        assert resp.status == 200
    by_name = spans(exporter)
    (root,) = by_name["chat fake"]
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert f"{parent_of(root):016x}" == CLIENT_SPAN
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["gen_ai.usage.output_tokens"] == 4
    first, second = sorted(by_name["router.attempt"], key=lambda s: s.attributes["microserve.attempt"])
    assert parent_of(first) == parent_of(second) == root.context.span_id
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes["microserve.failed_worker"] == servers[0].url
    assert second.attributes["microserve.retry"] is True and second.status.status_code is StatusCode.UNSET
    calls = sorted(by_name["router.generate"], key=lambda s: s.start_time or 0)
    assert [parent_of(c) for c in calls] == [first.context.span_id, second.context.span_id]
    assert calls[0].status.status_code is StatusCode.ERROR
    picks = by_name["router.pick"]
    assert [p.attributes["microserve.pick.reason"] for p in picks] == ["round_robin", "round_robin"]
    assert [parent_of(p) for p in picks] == [first.context.span_id, second.context.span_id]
    # Each worker got the trace context naming the router's call span as its parent.
    for server, call in zip(servers, calls, strict=True):
        assert sent_traceparent(server) == f"00-{TRACE_ID}-{call.context.span_id:016x}-01"
    assert all(s.context.trace_id == root.context.trace_id for s in exporter.get_finished_spans())


async def test_a_broken_stream_continues_under_a_continuation_span() -> None:
    async with fakes(2) as servers, traced(servers, kind=WorkerKind.MICROSERVE) as (client, exporter):
        servers[0].die_after = 2
        body = {"model": "fake", "prompt": "abcd", "max_tokens": 6, "stream": True}
        resp = await client.post("/v1/completions", json=body, headers={"traceparent": TRACEPARENT})
        assert (await resp.read()).rstrip().endswith(b"data: [DONE]")
    by_name = spans(exporter)
    (root,) = by_name["text_completion fake"]
    (attempt,) = by_name["router.attempt"]
    (continuation,) = by_name["router.continuation"]
    assert parent_of(attempt) == parent_of(continuation) == root.context.span_id
    assert attempt.status.status_code is StatusCode.ERROR
    assert continuation.attributes["microserve.broken_worker"] == servers[0].url
    assert continuation.attributes["microserve.delivered_tokens"] == 2
    (resume,) = by_name["router.resume"]
    assert parent_of(resume) == continuation.context.span_id
    assert resume.attributes["microserve.worker"] == servers[1].url
    assert sent_traceparent(servers[1]) == f"00-{TRACE_ID}-{resume.context.span_id:016x}-01"
    assert root.status.status_code is StatusCode.UNSET


async def test_a_refused_request_ends_its_spans_as_errors() -> None:
    async with fakes(1) as servers, traced(servers, retry=RetryConfig(max_attempts=1)) as (client, exporter):
        servers[0].statuses = [503]
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 503
        bad = await client.post("/v1/chat/completions", json={"model": "fake"})
        assert bad.status == 400
    by_name = spans(exporter)
    (failed,) = by_name["chat fake"]
    assert failed.parent is None  # no client context: the router starts the trace
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["http.response.status_code"] == 503
    (attempt,) = by_name["router.attempt"]
    assert attempt.status.status_code is StatusCode.ERROR
    (unparsed,) = by_name["chat"]  # refused before its model was read
    assert unparsed.attributes["http.response.status_code"] == 400


async def test_only_a_request_that_queued_has_an_admission_span() -> None:
    admission = AdmissionConfig(max_concurrent=1, max_queued=4)
    async with fakes(1) as servers, traced(servers, admission=admission) as (client, exporter):
        servers[0].delay = 0.05
        first = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        await servers[0].streaming.wait()  # it holds the only slot while it streams
        second = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        assert (await first.read()).rstrip().endswith(b"[DONE]")
        assert (await second).status == 200
    by_name = spans(exporter)
    (admission_span,) = by_name["router.admission"]
    roots = {s.context.span_id: s for s in by_name["chat fake"]}
    waited = roots[parent_of(admission_span)]
    assert waited.attributes["microserve.stream"] is False  # the second request
    assert admission_span.attributes["microserve.admission.waiting"] == 0
    assert admission_span.end_time >= admission_span.start_time  # type: ignore[operator]


@pytest.mark.parametrize("kind", [WorkerKind.OPENAI, WorkerKind.MICROSERVE])
async def test_tracing_off_sends_no_trace_context(kind: WorkerKind) -> None:
    async with fakes(1) as servers:
        router = Router(RouterConfig(workers=[WorkerSpec(servers[0].url, kind=kind)]))
        assert router.tracing is None
        async with serving(router) as client:
            resp = await client.post(
                "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"traceparent": TRACEPARENT}
            )
            await resp.read()
        headers = {k.lower() for k in servers[0].calls[0][2]}
        assert "traceparent" not in headers


async def test_an_unsampled_trace_makes_no_span_and_passes_the_decision_on() -> None:
    async with fakes(1) as servers, traced(servers) as (client, exporter):
        unsampled = f"00-{TRACE_ID}-{CLIENT_SPAN}-00"
        resp = await client.post("/v1/chat/completions", json=CHAT, headers={"traceparent": unsampled})
        assert resp.status == 200
    assert exporter.get_finished_spans() == ()
    # The worker hears the client's trace, not sampled, so that it records nothing either.
    sent = sent_traceparent(servers[0])
    assert sent.startswith(f"00-{TRACE_ID}-") and sent.endswith("-00")
