"""The engine's spans in process: the core's `Timeline` (queue wait, prefill chunks, first token, decode;
a prefill computed for another engine) and the spans `microserve.server.tracing` makes of it."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from microserve.engine.core import EngineCore
from microserve.engine.outputs import KVPiece, PrefillProgress, RequestOutput
from microserve.engine.sampling import SamplingParams
from microserve.server.tracing import GenerationSpan, SendSpan
from microserve.tracing import Tracing
from tests.test_engine_core import BLOCK, PROMPT, sim_core


def prompt(first: int) -> list[int]:
    """A prompt of PROMPT's length that no other test shares (the module's core keeps its cache)."""
    return [first + i for i in range(len(PROMPT))]


TRACEPARENT = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


@pytest.fixture(scope="module")
def core() -> EngineCore:
    return sim_core()  # loading the tokenizer is most of the time: once for the module


def in_memory() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> dict[str, ReadableSpan]:
    return {
        s.name: s
        for s in exporter.get_finished_spans()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    }


def test_the_last_output_carries_the_timeline(core: EngineCore) -> None:
    core.add_request("r", prompt(300), SamplingParams(max_tokens=3, ignore_eos=True))
    outputs: list[RequestOutput] = []
    while core.has_work():
        outputs += [o for o in core.step() if isinstance(o, RequestOutput)]
    assert [o.timeline is not None for o in outputs] == [False, False, True]
    timeline = outputs[-1].timeline
    assert timeline is not None
    assert timeline.prefill_chunks == -(-len(PROMPT) // BLOCK)  # 16 tokens a step: 3 chunks
    assert timeline.arrival <= timeline.scheduled <= timeline.first_token <= timeline.finished  # type: ignore[operator]
    assert (timeline.cached_tokens, timeline.preemptions) == (0, 0)


def test_a_prefill_for_another_engine_times_its_export(core: EngineCore) -> None:
    core.add_prefill("p", prompt(400), begin=0)
    progress: list[PrefillProgress] = []
    while core.has_work():
        progress += [o for o in core.step() if isinstance(o, PrefillProgress)]
    assert all(p.exported_at > 0 and p.export_s >= 0 for p in progress if p.payloads)
    assert [p.timeline is not None for p in progress] == [False, False, True]
    tracing, exporter = in_memory()
    span = SendSpan(tracing, TRACEPARENT, "engine.remote_send")
    for p in progress:
        span.exported(p)
    span.end()
    (root,) = [s for s in exporter.get_finished_spans() if s.name == "engine.remote_send"]
    assert f"{root.parent.span_id:016x}" == "00f067aa0ba902b7"  # type: ignore[union-attr]
    kids = [s for s in exporter.get_finished_spans() if s.parent and s.parent.span_id == root.context.span_id]
    names = sorted(s.name for s in kids)
    assert names == ["engine.kv_export"] * 3 + ["engine.prefill", "engine.queue_wait"]
    exported = sum(s.attributes["microserve.kv.tokens"] for s in kids if s.name == "engine.kv_export")
    assert exported == len(PROMPT)


async def _outputs(items: list[RequestOutput]):  # type: ignore[no-untyped-def]
    for item in items:
        await asyncio.sleep(0)
        yield item


def test_a_generation_span_has_usage_phases_and_first_token(core: EngineCore) -> None:
    core.add_request("g", prompt(500), SamplingParams(max_tokens=2, ignore_eos=True))
    outputs: list[RequestOutput] = []
    while core.has_work():
        outputs += [o for o in core.step() if isinstance(o, RequestOutput)]
    tracing, exporter = in_memory()
    span = GenerationSpan(tracing, TRACEPARENT, "engine.generate", {"gen_ai.request.model": "m"})

    async def consume() -> None:
        async for _ in span.watch(_outputs(outputs)):
            pass

    asyncio.run(consume())
    span.end()
    (root,) = [s for s in exporter.get_finished_spans() if s.name == "engine.generate"]
    assert root.attributes["gen_ai.usage.input_tokens"] == len(PROMPT)
    assert root.attributes["gen_ai.usage.output_tokens"] == 2
    assert root.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert [e.name for e in root.events] == ["first_token"]
    kids = children(exporter, root)
    assert set(kids) == {"engine.queue_wait", "engine.prefill", "engine.decode"}
    assert kids["engine.prefill"].attributes["microserve.prefill.chunks"] == 3
    assert kids["engine.queue_wait"].end_time <= kids["engine.prefill"].start_time + 1_000_000  # type: ignore[operator]
    assert kids["engine.prefill"].end_time <= kids["engine.decode"].start_time + 1_000_000  # type: ignore[operator]


def test_an_abandoned_generation_is_marked_and_has_no_phases() -> None:
    tracing, exporter = in_memory()
    span = GenerationSpan(tracing, {}, "engine.generate")
    span.end(ConnectionResetError("client left"))
    (root,) = exporter.get_finished_spans()
    assert root.attributes["microserve.aborted"] is True
    assert root.status.description == "ConnectionResetError: client left"


def test_an_unsampled_caller_gets_no_engine_spans() -> None:
    tracing, exporter = in_memory()
    unsampled = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}
    span = SendSpan(tracing, unsampled, "engine.remote_send")
    assert not span.recording
    with span.push(KVPiece(0, 16, b"kv"), "http://127.0.0.1:1/microserving/kv/x") as push:
        assert push.headers["traceparent"].endswith("-00")
    span.end()
    assert exporter.get_finished_spans() == ()
