"""OpenTelemetry for the router and the engines, configured only by the standard `OTEL_*` variables.

`Tracing.from_env(default_name)` is None when no OTLP endpoint is set: callers then keep None and every
hook is one `is None` test, and the SDK is never imported. Span helpers take explicit parents and times
(nothing rides on context variables), so spans open and close safely across async generators.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

# Either variable turns tracing on; the exporter reads them (and OTEL_EXPORTER_OTLP_*_HEADERS, _TIMEOUT,
# _COMPRESSION) itself, as the batch processor reads OTEL_BSP_* and the provider OTEL_TRACES_SAMPLER(_ARG).
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")

Attributes = dict[str, Any]


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something this installation cannot do (one line, for the CLI)."""


def enabled(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint is set and the SDK is not disabled."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def protocol(env: Mapping[str, str]) -> str:
    for name in PROTOCOL_VARIABLES:
        value = env.get(name, "").strip().lower()
        if value:
            return value
    return "http/protobuf"


def epoch_ns(monotonic_s: float, now_mono: float | None = None, now_ns: int | None = None) -> int:
    """A `time.monotonic()` reading as the wall-clock nanoseconds OTLP wants."""
    mono = time.monotonic() if now_mono is None else now_mono
    wall = time.time_ns() if now_ns is None else now_ns
    return wall - int((mono - monotonic_s) * 1e9)


class Tracing:
    """One process's tracer provider and OTLP exporter (no global provider is installed)."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("microserve")
        self._propagator = TraceContextTextMapPropagator()
        self._set_span_in_context = trace.set_span_in_context
        self._kinds = {"server": trace.SpanKind.SERVER, "client": trace.SpanKind.CLIENT}
        self._internal = trace.SpanKind.INTERNAL
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR

    @classmethod
    def from_env(
        cls, default_service: str, instance: str | None = None, env: Mapping[str, str] | None = None
    ) -> Tracing | None:
        """Tracing as the OTEL_* variables ask, or None if they ask for none; `default_service` names the
        process unless OTEL_SERVICE_NAME does, `instance` (its URL) is its `service.instance.id` unless
        OTEL_RESOURCE_ATTRIBUTES sets one. TracingConfigError for a protocol that cannot be served."""
        env = os.environ if env is None else env
        if not enabled(env):
            return None
        proto = protocol(env)
        if proto == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        elif proto == "grpc":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,no-redef]
                    OTLPSpanExporter,
                )
            except ImportError:
                raise TracingConfigError(
                    "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the package "
                    "opentelemetry-exporter-otlp-proto-grpc (pip install it), or use http/protobuf"
                ) from None
        else:
            raise TracingConfigError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={proto!r} is not supported: use http/protobuf or grpc"
            )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": default_service}
        if instance is not None and "service.instance.id" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
            attributes["service.instance.id"] = instance
        try:
            provider = TracerProvider(resource=Resource.create(attributes))  # sampler: OTEL_TRACES_SAMPLER
        except ValueError as exc:
            raise TracingConfigError(f"bad OTEL_* setting: {exc}") from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    # -- spans --------------------------------------------------------------------------------------

    def start(
        self,
        name: str,
        parent: Span | Context | None = None,
        *,
        kind: str = "internal",
        attributes: Attributes | None = None,
        start_ns: int | None = None,
    ) -> Span:
        """A span, child of `parent` (a span, or a context extracted from headers; None: a new trace)."""
        context = self._set_span_in_context(cast("Span", parent)) if _is_span(parent) else parent
        return self.tracer.start_span(
            name,
            context=context,  # type: ignore[arg-type]
            kind=self._kinds.get(kind, self._internal),
            attributes=attributes,
            start_time=start_ns,
        )

    def record(
        self,
        name: str,
        parent: Span,
        start_ns: int,
        end_ns: int,
        attributes: Attributes | None = None,
    ) -> Span:
        """A span that already happened (from timestamps the engine kept)."""
        span = self.start(name, parent, attributes=attributes, start_ns=start_ns)
        span.end(end_time=max(end_ns, start_ns))
        return span

    def fail(self, span: Span, message: str) -> None:
        span.set_status(self._status(self._error, message))

    # -- W3C trace context --------------------------------------------------------------------------

    def extract(self, headers: Mapping[str, str]) -> Context | None:
        """The caller's trace context from a `traceparent` header (any case), or None."""
        traceparent = headers.get("traceparent") or headers.get("Traceparent")
        if not traceparent:
            return None
        carrier = {"traceparent": traceparent}
        state = headers.get("tracestate") or headers.get("Tracestate")
        if state:
            carrier["tracestate"] = state
        return self._propagator.extract(carrier)

    def headers(self, span: Span) -> dict[str, str]:
        """`traceparent` (and `tracestate`) naming `span` as the parent of what the callee does.

        Written here rather than by the propagator, which costs several times more per call."""
        ctx = span.get_span_context()
        headers = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}
        if ctx.trace_state:
            headers["tracestate"] = ctx.trace_state.to_header()
        return headers

    def shutdown(self) -> None:
        """Export what is buffered, then stop (the processes call it as they stop)."""
        self.provider.shutdown()


def _is_span(value: object) -> bool:
    return value is not None and hasattr(value, "get_span_context")
