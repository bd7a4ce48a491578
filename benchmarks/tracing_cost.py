"""What tracing adds to one routed request in the router's process, timed in process (timeit, best of 5):
the spans of a data_parallel request that waited for admission (request, admission, attempt, pick, one
call with its traceparent)
with tracing on, exported by the batch processor to an exporter that drops them, and the same hooks with
tracing off; the peer in the same run is parsing the request (`RoutedRequest.parse`).

Usage: python benchmarks/tracing_cost.py [--number 20000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
import timeit
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from microserve.machine import describe_machine
from microserve.router.request import Route, RoutedRequest
from microserve.router.tracing import RequestTrace, call_span
from microserve.router.workers import Worker, WorkerPool, WorkerSpec
from microserve.tracing import Tracing

BODY = b'{"model":"mock","messages":[{"role":"user","content":"Say hi."}],"max_tokens":8}'
HEADERS = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


class Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def one_request(tracing: Tracing | None, worker: Worker, headers: dict[str, str] = HEADERS) -> None:
    """The tracing hooks a data_parallel request passes through (dispatch, router.pick, upstream)."""
    started = time.perf_counter()
    trace = None if tracing is None else RequestTrace(tracing, Route.CHAT, headers, started)
    req = RoutedRequest.parse(Route.CHAT, BODY, headers)
    if trace is not None:
        req.trace = trace
        trace.parsed(req)
        trace.admission_begins(0)
        trace.admitted()
    if req.trace is not None:
        req.trace.attempt(0, "data_parallel")
    if req.trace is not None:
        req.trace.pick("both", worker, "round_robin", 2)
    call = call_span(req, "generate", worker, microserve__stream=False)
    headers = {"Content-Type": "application/json"}
    trace_headers = call.headers
    if trace_headers is not None:
        headers.update(trace_headers)
    call.end()
    if trace is not None:
        trace.finish(200, req)


def best_us(fn: object, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--number", type=int, default=20_000)
    args = ap.parse_args()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=65_536))
    tracing = Tracing(provider)
    sampled = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.01)))
    sampled.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=65_536))
    worker = WorkerPool().add(WorkerSpec("http://127.0.0.1:1"))
    parse = best_us(lambda: RoutedRequest.parse(Route.CHAT, BODY, HEADERS), args.number)
    off = best_us(lambda: one_request(None, worker), args.number)
    on = best_us(lambda: one_request(tracing, worker), args.number)
    one_percent = best_us(lambda: one_request(Tracing(sampled), worker, {}), args.number)
    provider.shutdown()
    sampled.shutdown()
    print(f"# tracing cost per request — {dt.date.today().isoformat()}, {describe_machine()}")
    print("| what | µs per request | vs parse |")
    print("|---|---|---|")
    print(f"| RoutedRequest.parse alone (peer) | {parse:.1f} | 1.00 |")
    print(f"| parse + the tracing hooks, tracing off | {off:.1f} | {off / parse:.2f} |")
    print(f"| parse + the spans, tracing on (5 spans, traceparent out) | {on:.1f} | {on / parse:.2f} |")
    row = "the same, 1% of traces sampled (no client traceparent)"
    print(f"| {row} | {one_percent:.1f} | {one_percent / parse:.2f} |")


if __name__ == "__main__":
    main()
