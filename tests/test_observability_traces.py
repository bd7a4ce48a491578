"""Traces end to end: a router and two sim engines (real processes) export OTLP/HTTP to a real receiver
in the test; a client's `traceparent` makes one trace of the router's and the engines' spans, in the
right parent/child order, under the PD strategy (KV pushed engine to engine) and under data_parallel."""

from __future__ import annotations

import contextlib
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from microserve.processes import ManagedProcess, free_port
from tests.observed_fleet import ADMIN, ADMIN_TOKEN, INTERNAL_ENV, MODEL, wait_until, write_profile
from tests.otlp_receiver import OTLPReceiver, ReceivedSpan

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def traced_fleet(
    tmp: Path,
    receiver: OTLPReceiver,
    backend: str = "sim",
    engines: int = 2,
    strategy: str = "pd",
    step_s: float = 0.002,
) -> Iterator[tuple[str, list[ManagedProcess]]]:
    """Engines and a router exporting spans to `receiver`; yields (router URL, engine processes)."""
    env = {
        **INTERNAL_ENV,  # KV moves engine to engine only between engines that share the internal token
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within 50 ms, not 5 s
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    with contextlib.ExitStack() as stack:
        started = []
        for _ in range(engines):
            port = free_port()
            cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "engine",
                   "--backend", backend, "--port", str(port), "--threads", "1"]  # fmt: skip
            if backend == "sim":
                cmd += ["--sim-profile", str(write_profile(tmp / "profile.json", step_s))]
            else:
                cmd += ["--max-model-len", "256", "--kv-cache-memory", "64MiB"]
            engine = ManagedProcess(cmd, f"http://127.0.0.1:{port}", env)
            stack.callback(engine.stop)
            started.append(engine)
        for engine in started:
            engine.wait_ready(timeout=300)
        port = free_port()
        cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "router",
               "--port", str(port), "--strategy", strategy, "--admin-token", ADMIN_TOKEN]  # fmt: skip
        for engine in started:
            cmd += ["--worker", engine.url]
        router = ManagedProcess(cmd, f"http://127.0.0.1:{port}", env)
        stack.callback(router.stop)
        router.wait_ready(timeout=120)
        yield router.url, started


def send(url: str, traceparent: str, *, stream: bool, chat: bool) -> None:
    body: dict = {"model": MODEL, "max_tokens": 6, "stream": stream, "ignore_eos": True}
    words = "Tell me about the history of printing presses in Europe, briefly. " * 3
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with httpx.stream(
        "POST", url + path, json=body, headers={"traceparent": traceparent}, timeout=120
    ) as resp:
        data = resp.read()
        assert resp.status_code == 200, data
        if stream:
            assert data.rstrip().endswith(b"data: [DONE]")


def client_context() -> tuple[str, str, str]:
    """A client's trace id, span id and the traceparent naming them."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


class Trace:
    def __init__(self, spans: list[ReceivedSpan]) -> None:
        self.spans = spans
        self.by_id = {s.span_id: s for s in spans}

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> ReceivedSpan:
        found = self.named(name)
        assert len(found) == 1, f"{len(found)} spans named {name}: {[s.name for s in self.spans]}"
        return found[0]

    def parent(self, span: ReceivedSpan) -> ReceivedSpan:
        assert span.parent_id in self.by_id, f"{span.name}'s parent is not in the trace"
        return self.by_id[span.parent_id]

    def children(self, span: ReceivedSpan, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.parent_id == span.span_id and s.name == name]

    def child(self, span: ReceivedSpan, name: str) -> ReceivedSpan:
        found = self.children(span, name)
        assert len(found) == 1, f"{span.name} has {len(found)} children named {name}"
        return found[0]


def collected(receiver: OTLPReceiver, trace_id: str, names: set[str]) -> Trace:
    """The trace once every span in `names` arrived (the processes export in batches)."""

    def complete() -> list[ReceivedSpan] | None:
        spans = receiver.trace(trace_id)
        return spans if names <= {s.name for s in spans} else None

    return Trace(wait_until(complete, f"the spans {sorted(names)} of trace {trace_id}"))


def check_phases(trace: Trace, engine_span: ReceivedSpan, *, decode: bool) -> None:
    """The engine's phases hang under its span, in time order."""
    queue = trace.child(engine_span, "engine.queue_wait")
    prefill = trace.child(engine_span, "engine.prefill")
    assert queue.end_ns <= prefill.start_ns + 1_000_000  # 1 ms: two clocks converted on export
    assert prefill.attributes["microserve.prefill.chunks"] >= 1
    assert "microserve.prefill.cached_tokens" in prefill.attributes
    for span in (queue, prefill):
        assert span.service == engine_span.service and span.instance == engine_span.instance
    if decode:
        decode_span = trace.child(engine_span, "engine.decode")
        assert prefill.end_ns <= decode_span.start_ns + 1_000_000
        assert "first_token" in engine_span.events


ROUTER_PD = {"router.attempt", "router.pick", "router.prep_recv", "router.remote_send",
             "router.start_generate"}  # fmt: skip
ENGINE_PD = {"engine.prep_recv", "engine.remote_send", "engine.kv_export", "engine.kv_push",
             "engine.kv_import", "engine.start_generate", "engine.queue_wait", "engine.prefill",
             "engine.decode"}  # fmt: skip


def check_pd(receiver: OTLPReceiver, url: str, engines: list[str]) -> None:
    trace_id, client_span, traceparent = client_context()
    send(url, traceparent, stream=True, chat=True)
    trace = collected(receiver, trace_id, ROUTER_PD | ENGINE_PD | {f"chat {MODEL}"})

    root = trace.one(f"chat {MODEL}")
    assert root.parent_id == client_span and root.kind == "server" and root.service == "microserve-router"
    assert root.attributes["gen_ai.request.model"] == MODEL
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["gen_ai.usage.output_tokens"] == 6
    assert not trace.named("router.admission")  # it did not wait in the admission queue
    attempt = trace.one("router.attempt")
    assert trace.parent(attempt) is root and attempt.attributes["microserve.strategy"] == "pd"
    picks = {p.attributes["microserve.role"]: p for p in trace.children(attempt, "router.pick")}
    assert set(picks) == {"prefill", "decode"}
    prefill_url = picks["prefill"].attributes["microserve.worker"]
    decode_url = picks["decode"].attributes["microserve.worker"]
    assert {prefill_url, decode_url} == set(engines)
    assert picks["decode"].attributes["microserve.pick.reason"] == "round_robin"

    # Each verb: a client span under the attempt, the engine's server span under it, on that engine.
    verbs = {}
    for verb, worker in (
        ("prep_recv", decode_url),
        ("remote_send", prefill_url),
        ("start_generate", decode_url),
    ):
        call = trace.child(attempt, f"router.{verb}")
        assert call.kind == "client" and call.attributes["microserve.worker"] == worker
        served = trace.child(call, f"engine.{verb}")
        assert served.kind == "server" and served.service == "microserve-engine" and served.instance == worker
        verbs[verb] = (call, served)
    assert verbs["prep_recv"][1].attributes["microserve.matched_tokens"] == 0

    # The KV push: prefill engine -> decode engine, in the same trace.
    send_call, send_span = verbs["remote_send"]
    assert send_call.attributes["microserve.kv.bytes"] > 0
    assert send_span.attributes["microserve.kv.bytes"] == send_call.attributes["microserve.kv.bytes"]
    check_phases(trace, send_span, decode=False)
    assert trace.children(send_span, "engine.kv_export")
    pushes = trace.children(send_span, "engine.kv_push")
    assert pushes and all(p.kind == "client" and p.instance == prefill_url for p in pushes)
    imports = [trace.child(push, "engine.kv_import") for push in pushes]
    assert all(i.kind == "server" and i.instance == decode_url for i in imports)
    assert (
        sum(i.attributes["microserve.kv.bytes"] for i in imports)
        == send_span.attributes["microserve.kv.bytes"]
    )

    generate = verbs["start_generate"][1]
    assert generate.attributes["gen_ai.usage.output_tokens"] == 6
    assert generate.attributes["gen_ai.usage.input_tokens"] > 1
    assert generate.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert generate.attributes["gen_ai.usage.cache_read.input_tokens"] >= 1  # the KV that arrived
    check_phases(trace, generate, decode=True)
    assert all(s.trace_id == trace_id and not s.error for s in trace.spans)


def check_data_parallel(receiver: OTLPReceiver, url: str, engines: list[str]) -> None:
    resp = httpx.put(url + "/admin/strategy", json={"name": "data_parallel"}, headers=ADMIN, timeout=60)
    assert resp.status_code == 200, resp.text
    trace_id, client_span, traceparent = client_context()
    send(url, traceparent, stream=False, chat=False)
    names = {f"text_completion {MODEL}", "router.attempt", "router.pick", "router.generate",
             "engine.generate", "engine.queue_wait", "engine.prefill", "engine.decode"}  # fmt: skip
    trace = collected(receiver, trace_id, names)
    root = trace.one(f"text_completion {MODEL}")
    assert root.parent_id == client_span
    attempt = trace.child(root, "router.attempt")
    assert attempt.attributes["microserve.strategy"] == "data_parallel"
    pick = trace.child(attempt, "router.pick")
    call = trace.child(attempt, "router.generate")
    assert call.attributes["microserve.worker"] == pick.attributes["microserve.worker"]
    served = trace.child(call, "engine.generate")
    assert served.instance == pick.attributes["microserve.worker"] and served.instance in engines
    assert served.attributes["gen_ai.operation.name"] == "text_completion"
    assert served.attributes["gen_ai.usage.output_tokens"] == 6
    check_phases(trace, served, decode=True)


def check_without_traceparent(receiver: OTLPReceiver, url: str) -> None:
    """No client context: the router's span is the root of a new trace, and the engines join it."""
    body = {"model": MODEL, "prompt": "Hello there, engine, hello.", "max_tokens": 3}
    assert httpx.post(url + "/v1/completions", json=body, timeout=120).status_code == 200

    def root() -> ReceivedSpan | None:
        found = [s for s in receiver.spans if s.name == f"text_completion {MODEL}" and not s.parent_id]
        return found[0] if found else None

    trace_id = wait_until(root, "a root span from the router").trace_id
    collected(receiver, trace_id, {"router.generate", "engine.generate"})


def test_one_trace_through_router_and_sim_engines(tmp_path: Path) -> None:
    with OTLPReceiver() as receiver, traced_fleet(tmp_path, receiver) as (url, engines):
        urls = [e.url for e in engines]
        check_pd(receiver, url, urls)
        check_data_parallel(receiver, url, urls)
        check_without_traceparent(receiver, url)


def test_one_trace_through_router_and_a_torch_engine(tmp_path: Path) -> None:
    """The same under data_parallel with the real model: the torch engine's phases are real compute."""
    with (
        OTLPReceiver() as receiver,
        traced_fleet(tmp_path, receiver, backend="torch", engines=1, strategy="data_parallel") as (
            url,
            engines,
        ),
    ):
        check_data_parallel(receiver, url, [e.url for e in engines])


def test_a_stream_continued_after_its_engine_died_stays_one_trace(tmp_path: Path) -> None:
    """The engine streaming a request is killed: the broken attempt, the continuation and the other
    engine's generation are all in the client's trace."""
    with (
        OTLPReceiver() as receiver,
        traced_fleet(tmp_path, receiver, strategy="data_parallel", step_s=0.02) as (url, engines),
    ):
        trace_id, client_span, traceparent = client_context()
        body = {"model": MODEL, "prompt": "Once upon a time, in a land far away,", "max_tokens": 150,
                "ignore_eos": True, "stream": True}  # fmt: skip
        with httpx.stream(
            "POST", url + "/v1/completions", json=body, headers={"traceparent": traceparent}, timeout=120
        ) as resp:
            chunks = resp.iter_bytes()
            next(chunks)  # it streams: find the engine serving it and kill that one

            def serving() -> ManagedProcess | None:
                busy = [e for e in engines if httpx.get(e.url + "/load", timeout=10).json()["running"]]
                return busy[0] if busy else None

            victim = wait_until(serving, "the engine serving the stream")
            victim.kill()
            rest = b"".join(chunks)
        assert rest.rstrip().endswith(b"data: [DONE]")
        survivor = next(e.url for e in engines if e is not victim)
        names = {"router.attempt", "router.continuation", "router.resume", "engine.generate"}
        trace = collected(receiver, trace_id, names)
        root = trace.one(f"text_completion {MODEL}")
        assert root.parent_id == client_span and not root.error
        attempt, continuation = trace.one("router.attempt"), trace.one("router.continuation")
        assert trace.parent(attempt) is root and trace.parent(continuation) is root
        assert attempt.error and attempt.attributes["microserve.failed_worker"] == victim.url
        assert continuation.attributes["microserve.broken_worker"] == victim.url
        assert continuation.attributes["microserve.delivered_tokens"] >= 1
        resume = trace.child(continuation, "router.resume")
        assert resume.attributes["microserve.worker"] == survivor
        served = trace.child(resume, "engine.generate")
        assert served.instance == survivor
        assert served.attributes["gen_ai.usage.output_tokens"] < 150  # only the rest of the answer
