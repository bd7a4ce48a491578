"""Tracing set up from the OTEL_* variables only: off (and the SDK never imported) when none is set, the
protocols it can and cannot serve, the service name and instance, and the W3C trace context both ways."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider

from microserve.tracing import Tracing, TracingConfigError, enabled, epoch_ns

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),  # no endpoint: off
        (ENDPOINT, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}, False),
        ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_tracing_is_on_only_with_an_endpoint(env: dict[str, str], on: bool) -> None:
    assert enabled(env) is on
    tracing = Tracing.from_env("svc", env=env)
    assert (tracing is not None) is on
    if tracing is not None:
        tracing.shutdown()


def test_off_imports_no_sdk() -> None:
    """Starting a router and an engine app without OTEL_* variables loads none of the SDK."""
    code = (
        "import sys\n"
        "import microserve.router.app, microserve.server.engine_main\n"
        "from microserve.tracing import Tracing\n"
        "assert Tracing.from_env('microserve-router', env={}) is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_protocols() -> None:
    with pytest.raises(TracingConfigError, match="http/json"):
        Tracing.from_env("svc", env={**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    grpc = {**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with pytest.raises(TracingConfigError, match="opentelemetry-exporter-otlp-proto-grpc"):
            Tracing.from_env("svc", env=grpc)
    else:
        tracing = Tracing.from_env("svc", env=grpc)
        assert tracing is not None
        tracing.shutdown()


def test_service_name_and_instance() -> None:
    tracing = Tracing.from_env("microserve-engine", "http://127.0.0.1:8001", env=ENDPOINT)
    assert tracing is not None
    attributes = tracing.provider.resource.attributes
    assert attributes["service.name"] == "microserve-engine"
    assert attributes["service.instance.id"] == "http://127.0.0.1:8001"
    tracing.shutdown()


def test_trace_context_in_and_out() -> None:
    tracing = Tracing(TracerProvider())
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    context = tracing.extract({"traceparent": f"00-{trace_id}-{parent_id}-01", "tracestate": "k=v"})
    span = tracing.start("child", context, kind="server")
    assert f"{span.get_span_context().trace_id:032x}" == trace_id
    assert f"{span.parent.span_id:016x}" == parent_id  # type: ignore[attr-defined]
    headers = tracing.headers(span)
    assert headers["traceparent"] == f"00-{trace_id}-{span.get_span_context().span_id:016x}-01"
    assert headers["tracestate"] == "k=v"
    span.end()
    assert tracing.extract({}) is None
    fresh = tracing.start("root", tracing.extract({"traceparent": "garbage"}))
    assert fresh.parent is None  # type: ignore[attr-defined]


def test_epoch_ns() -> None:
    assert epoch_ns(10.0, now_mono=12.5, now_ns=1_000_000_000_000) == 1_000_000_000_000 - 2_500_000_000
