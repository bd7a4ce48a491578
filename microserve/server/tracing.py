"""An engine's spans for one HTTP call: a server span under the caller's `traceparent`, and after the
work the phases the engine core timed (queue wait, prefill, first token, decode; KV export, push and
import). Framework-neutral: handlers pass their request's headers and call these few helpers."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Self

from microserve.api.shapes import ChatShape
from microserve.engine.outputs import KVPiece, PrefillProgress, RequestOutput, Timeline
from microserve.tracing import Attributes, Tracing, epoch_ns

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from microserve.server.handlers import Prepared

Outputs = AsyncGenerator[RequestOutput, None]
Watch = Callable[[Outputs], Outputs]


class EngineSpan:
    """One engine call as a server span; `end` records its outcome and closes it."""

    __slots__ = ("recording", "span", "tracing")

    def __init__(
        self, tracing: Tracing, headers: Mapping[str, str], name: str, attributes: Attributes | None = None
    ) -> None:
        self.tracing = tracing
        self.span: Span = tracing.start(name, tracing.extract(headers), kind="server", attributes=attributes)
        self.recording = self.span.is_recording()  # False: the caller's trace is not sampled

    def set(self, **attributes: Any) -> None:
        for key, value in attributes.items():
            if value is not None:
                self.span.set_attribute(key.replace("__", "."), value)

    def end(self, error: BaseException | None = None) -> None:
        """Close the span; `error` (the exception leaving the handler, if any) marks it failed."""
        if error is not None and not isinstance(error, GeneratorExit):
            status = getattr(error, "status", None)
            if status is not None:
                self.span.set_attribute("http.response.status_code", status)
            self.tracing.fail(self.span, f"{type(error).__name__}: {error}")
        self.span.end()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.end(exc)


class GenerationSpan(EngineSpan):
    """A generation (OpenAI route or start_generate): watches the engine's outputs as they pass and, at
    the end, adds the phases from the last output's `Timeline` and the GenAI usage attributes."""

    __slots__ = ("first_token_ns", "last")

    def __init__(
        self, tracing: Tracing, headers: Mapping[str, str], name: str, attributes: Attributes | None = None
    ) -> None:
        super().__init__(tracing, headers, name, attributes)
        self.last: RequestOutput | None = None
        self.first_token_ns: int | None = None

    async def watch(self, gen: Outputs) -> Outputs:
        """`gen`, passed through; closing this closes `gen` (the engine request aborts as before)."""
        async with aclosing(gen):
            async for output in gen:
                if self.first_token_ns is None and output.completion_tokens:
                    self.first_token_ns = time.time_ns()
                    self.span.add_event("first_token", timestamp=self.first_token_ns)
                self.last = output
                yield output

    def end(self, error: BaseException | None = None) -> None:
        last = self.last
        if last is not None and self.recording:
            self.set(
                gen_ai__usage__input_tokens=last.prompt_tokens,
                gen_ai__usage__output_tokens=last.completion_tokens,
                gen_ai__usage__cache_read__input_tokens=last.cached_tokens,
            )
            if last.finish_reason is not None:
                self.span.set_attribute("gen_ai.response.finish_reasons", [str(last.finish_reason)])
            if last.timeline is not None:
                record_phases(self.tracing, self.span, last.timeline, decode=True)
        if self.last is None or not self.last.finished:
            self.span.set_attribute("microserve.aborted", True)
        super().end(error)


def generation_span(tracing: Tracing, headers: Mapping[str, str], prepared: Prepared) -> GenerationSpan:
    """The span of a generation: `engine.generate` (an OpenAI route) or `engine.start_generate`."""
    params, shape = prepared.params, prepared.shape
    chat = isinstance(shape, ChatShape)
    attributes: Attributes = {
        "gen_ai.operation.name": "chat" if chat else "text_completion",
        "gen_ai.request.model": shape.model,
        "gen_ai.request.max_tokens": params.max_tokens,
        "gen_ai.request.temperature": params.temperature,
        "gen_ai.request.top_p": params.top_p,
        "gen_ai.response.id": shape.id,
        "microserve.stream": prepared.stream,
        "microserve.prompt_tokens": len(prepared.prompt_ids),
    }
    if prepared.request_id is not None:
        attributes["microserve.request_id"] = prepared.request_id
    name = "engine.generate"
    if prepared.begin is not None:
        name = "engine.start_generate"
        attributes["microserve.begin"] = prepared.begin
    return GenerationSpan(tracing, headers, name, attributes)


def record_phases(tracing: Tracing, parent: Span, timeline: Timeline, *, decode: bool) -> None:
    """Child spans of `parent` for the phases in `timeline`: queue wait, prefill and (if) decode."""
    now_mono, now_ns = time.monotonic(), time.time_ns()

    def ns(mono: float) -> int:
        return epoch_ns(mono, now_mono, now_ns)

    scheduled = timeline.scheduled
    tracing.record(
        "engine.queue_wait",
        parent,
        ns(timeline.arrival),
        ns(scheduled if scheduled is not None else timeline.finished),
        {"microserve.preemptions": timeline.preemptions},
    )
    if scheduled is None:
        return
    prefill_end = timeline.first_token if timeline.first_token is not None else timeline.finished
    tracing.record(
        "engine.prefill",
        parent,
        ns(scheduled),
        ns(prefill_end),
        {
            "microserve.prefill.chunks": timeline.prefill_chunks,
            "microserve.prefill.cached_tokens": timeline.cached_tokens,
        },
    )
    if decode and timeline.first_token is not None:
        tracing.record("engine.decode", parent, ns(timeline.first_token), ns(timeline.finished))


class SendSpan(EngineSpan):
    """remote_send: the prefill computed for another engine, each export, each push to the receiver."""

    __slots__ = ()

    def exported(self, progress: PrefillProgress) -> None:
        if not self.recording:
            return
        if progress.payloads:
            start = epoch_ns(progress.exported_at)
            tracing = self.tracing
            tracing.record(
                "engine.kv_export",
                self.span,
                start,
                start + int(progress.export_s * 1e9),
                {
                    "microserve.kv.tokens": sum(p.num_tokens for p in progress.payloads),
                    "microserve.kv.bytes": sum(len(p.data) for p in progress.payloads),
                },
            )
        if progress.timeline is not None:
            record_phases(self.tracing, self.span, progress.timeline, decode=False)

    def push(self, piece: KVPiece, url: str) -> PushSpan:
        return PushSpan(self, piece, url)


class PushSpan:
    """One KV piece's POST to the receiving engine (a client span whose `headers` carry the trace)."""

    __slots__ = ("_send", "span")

    def __init__(self, send: SendSpan, piece: KVPiece, url: str) -> None:
        self._send = send
        if not send.recording:  # pass the unsampled context on, make no span
            self.span = send.span
            return
        self.span = send.tracing.start(
            "engine.kv_push",
            send.span,
            kind="client",
            attributes={
                "url.full": url,
                "microserve.kv.begin": piece.begin,
                "microserve.kv.end": piece.end,
                "microserve.kv.tokens": piece.num_tokens,
                "microserve.kv.bytes": len(piece.data),
            },
        )

    @property
    def headers(self) -> dict[str, str]:
        return self._send.tracing.headers(self.span)

    def __enter__(self) -> PushSpan:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if not self._send.recording:
            return
        if exc is not None:
            self._send.tracing.fail(self.span, f"{type(exc).__name__}: {exc}")
        self.span.end()
