"""The spans of one client request in the router: the request (a server span under the client's
`traceparent`), admission, each attempt or continuation, each pick and each call to a worker, whose
`traceparent` makes the engine's spans its children. Only built when tracing is on (`req.trace`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from microserve.router.request import Route
from microserve.tracing import Attributes, Tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from microserve.router.request import RoutedRequest
    from microserve.router.workers import Worker

OPERATIONS = {Route.CHAT: "chat", Route.COMPLETIONS: "text_completion"}
_ENDED_EARLY = (GeneratorExit,)  # a stream closed by its consumer: not a failure of the call


class RequestTrace:
    """Spans for one request. `parent` is the open attempt (or continuation) that calls hang under.

    A request the sampler leaves out makes no span but its root: its calls still send the root's
    `traceparent` (flag "not sampled"), so the engines leave it out too, at almost no cost."""

    __slots__ = ("_admission", "parent", "recording", "root", "tracing")

    def __init__(self, tracing: Tracing, route: Route, headers: Mapping[str, str], started: float) -> None:
        """`started`: the request's `time.perf_counter()` on arrival, so the span covers its parsing."""
        self.tracing = tracing
        start_ns = time.time_ns() - int((time.perf_counter() - started) * 1e9)
        operation = OPERATIONS[route]
        self.root: Span = tracing.start(
            operation,
            tracing.extract(headers),
            kind="server",
            attributes={
                "gen_ai.operation.name": operation,
                "http.request.method": "POST",
                "url.path": route.value,
            },
            start_ns=start_ns,
        )
        self.parent: Span | None = None
        self._admission: Span | None = None
        self.recording = self.root.is_recording()

    def parsed(self, req: RoutedRequest) -> None:
        if not self.recording:
            return
        model = req.model or ""
        self.root.update_name(f"{OPERATIONS[req.route]} {model}".strip())
        attributes: Attributes = {"gen_ai.request.model": model, "microserve.stream": req.stream}
        max_tokens = req.max_tokens
        if max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = max_tokens
        for field in ("temperature", "top_p"):
            value = req.body.get(field)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attributes[f"gen_ai.request.{field}"] = value
        self.root.set_attributes(attributes)

    # -- admission ----------------------------------------------------------------------------------

    def admission_begins(self, waiting: int) -> None:
        if not self.recording:
            return
        self._admission = self.tracing.start(
            "router.admission", self.root, attributes={"microserve.admission.waiting": waiting}
        )

    def admitted(self) -> None:
        if self._admission is not None:
            self._admission.end()
            self._admission = None

    # -- attempts and continuations -----------------------------------------------------------------

    def attempt(self, number: int, strategy: str) -> None:
        """A new attempt of the strategy (number 0 is the first, later ones are retries, whose backoff
        is the gap since the attempt before)."""
        if not self.recording:
            return
        self._close_parent()
        attributes: Attributes = {"microserve.attempt": number, "microserve.strategy": strategy}
        if number:
            attributes["microserve.retry"] = True
        self.parent = self.tracing.start("router.attempt", self.root, attributes=attributes)

    def attempt_failed(self, worker: Worker, message: str) -> None:
        if self.parent is not None:
            self.parent.set_attribute("microserve.failed_worker", worker.url)
            self.tracing.fail(self.parent, message)
        self._close_parent()

    def continuation(self, number: int, worker: Worker, message: str, delivered_tokens: int) -> None:
        """The stream broke on `worker`: what follows continues it elsewhere, under a span of its own."""
        if not self.recording:
            return
        if self.parent is not None:
            self.parent.set_attribute("microserve.failed_worker", worker.url)
            self.tracing.fail(self.parent, f"the stream broke: {message}")
        self._close_parent()
        self.parent = self.tracing.start(
            "router.continuation",
            self.root,
            attributes={
                "microserve.continuation": number,
                "microserve.broken_worker": worker.url,
                "microserve.broken_reason": message,
                "microserve.delivered_tokens": delivered_tokens,
            },
        )

    def _close_parent(self) -> None:
        if self.parent is not None:
            self.parent.end()
            self.parent = None

    # -- picks and calls ----------------------------------------------------------------------------

    def pick(self, role: str, worker: Worker, reason: str, candidates: int) -> None:
        if not self.recording:
            return
        span = self.tracing.start(
            "router.pick",
            self.parent or self.root,
            attributes={
                "microserve.role": role,
                "microserve.worker": worker.url,
                "microserve.worker.kind": str(worker.kind),
                "microserve.worker.in_flight": worker.in_flight,
                "microserve.pick.reason": reason,
                "microserve.pick.candidates": candidates,
            },
        )
        span.end()

    def call(self, verb: str, worker: Worker, **attributes: Any) -> Span:
        """A client span for one call to `worker` (the root, if not recording); send `headers(span)`."""
        if not self.recording:
            return self.root
        attrs: Attributes = {
            "microserve.verb": verb,
            "microserve.worker": worker.url,
            "server.address": worker.url,
        }
        attrs.update({k.replace("__", "."): v for k, v in attributes.items() if v is not None})
        return self.tracing.start(f"router.{verb}", self.parent or self.root, kind="client", attributes=attrs)

    def headers(self, span: Span) -> dict[str, str]:
        return self.tracing.headers(span)

    # -- the end ------------------------------------------------------------------------------------

    def finish(self, status: int, req: RoutedRequest | None) -> None:
        """End every open span with the request's HTTP status."""
        if not self.recording:
            self.root.end()
            return
        if self._admission is not None:
            self.tracing.fail(self._admission, f"not admitted (HTTP {status})")
            self.admitted()
        if self.parent is not None and status >= 400:
            self.tracing.fail(self.parent, f"HTTP {status}")
        self._close_parent()
        root = self.root
        root.set_attribute("http.response.status_code", status)
        if req is not None:
            if req.known_prompt_tokens is not None:
                root.set_attribute("gen_ai.usage.input_tokens", req.known_prompt_tokens)
            output_tokens, cached_tokens = req.token_counts()
            if output_tokens is not None:
                root.set_attribute("gen_ai.usage.output_tokens", output_tokens)
            if cached_tokens is not None:
                root.set_attribute("gen_ai.usage.cache_read.input_tokens", cached_tokens)
            if req.known_id is not None:
                root.set_attribute("microserve.request_id", req.known_id)
        if status >= 400:
            self.tracing.fail(root, f"HTTP {status}")
        root.end()


class CallSpan:
    """A call to a worker for `req` in a span: `headers` go with the call; `fail`, then `end`."""

    __slots__ = ("span", "trace")

    def __init__(self, trace: RequestTrace, verb: str, worker: Worker, attributes: dict[str, Any]) -> None:
        self.trace = trace
        self.span = trace.call(verb, worker, **attributes)

    @property
    def headers(self) -> dict[str, str]:
        return self.trace.headers(self.span)

    def set(self, **attributes: Any) -> None:
        for key, value in attributes.items():
            if value is not None:
                self.span.set_attribute(key.replace("__", "."), value)

    def fail(self, error: BaseException) -> None:
        if self.trace.recording and not isinstance(error, _ENDED_EARLY):
            self.trace.tracing.fail(self.span, f"{type(error).__name__}: {error}")

    def end(self) -> None:
        if self.trace.recording:
            self.span.end()


class _NoCall:
    """What `call_span` gives when tracing is off: every method does nothing."""

    __slots__ = ()
    headers = None

    def set(self, **attributes: Any) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass

    def end(self) -> None:
        pass


NO_CALL = _NoCall()


def call_span(req: RoutedRequest, verb: str, worker: Worker, **attributes: Any) -> CallSpan | _NoCall:
    """The span of one call to `worker` (`key__sub` names the attribute `key.sub`), or NO_CALL."""
    if req.trace is None:
        return NO_CALL
    return CallSpan(req.trace, verb, worker, attributes)
