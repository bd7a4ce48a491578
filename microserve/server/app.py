"""The engine's HTTP server: OpenAI routes, health, readiness, load and Prometheus metrics, served by
microserve's lean HTTP server (`microserve.http.server`), the router's, with its connection limits.

Handlers only parse, call one function and shape the answer; the work lives in `handlers.py`.
Why not aiohttp (the engine's server before): `benchmarks/engine_http.py`, figures in docs/reliability.md.
"""

from __future__ import annotations

import functools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any
from urllib.parse import unquote

from microserve.api import tokenize as api_tokenize
from microserve.api.embeddings import EmbeddingRequest
from microserve.api.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from microserve.api.tokenize import DetokenizeRequest, TokenizeRequest
from microserve.api.tool_calls import syntax_for_template
from microserve.http.limits import ConnectionLimits
from microserve.http.server import HTTPServer, Request, Response, Routes, Stream
from microserve.server.embeddings import embeddings
from microserve.server.handlers import ServerState, ServingEngine, prepare, serve
from microserve.server.heap import HeapTrimmer
from microserve.server.metrics import ServerMetrics
from microserve.server.prompt_limits import prompt_body_limit
from microserve.tracing import Tracing

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]


class EngineApp:
    """An engine's routes and the state they share, and the server that serves them: `start` runs the
    startup hooks and listens, `stop` drains (/ready 503, new requests 503, requests in flight finish,
    answers sent with `Connection: close`), then runs the cleanup hooks. Also an async context manager
    (a free port on loopback)."""

    def __init__(
        self,
        engine: ServingEngine,
        *,
        served_model_names: list[str] | None = None,
        max_waiting: int | None = None,
        limits: ConnectionLimits | None = None,
        max_body_bytes: int | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        names = list(served_model_names or [engine.model_name])
        self.state = ServerState(
            engine=engine,
            served_model_names=names,
            metrics=ServerMetrics(engine.load, names[0]),
            max_waiting=max_waiting,
            tracing=tracing,
        )
        self.started = int(time.time())
        # A prompt body is sized to the context: a huge one is refused from its Content-Length.
        self.max_body_bytes = max_body_bytes or prompt_body_limit(engine.max_model_len)
        self.routes = Routes()
        self.routes.add("POST", "/v1/completions", self.completions, max_body=self.max_body_bytes)
        self.routes.add("POST", "/v1/chat/completions", self.chat_completions, max_body=self.max_body_bytes)
        self.routes.add("POST", "/v1/embeddings", self.embeddings, max_body=self.max_body_bytes)
        self.routes.add("GET", "/v1/models", self.models)
        self.routes.add_prefix("GET", "/v1/models/", self.model_card)
        self.routes.add("POST", "/tokenize", self.tokenize, max_body=self.max_body_bytes)
        self.routes.add("POST", "/detokenize", self.detokenize, max_body=self.max_body_bytes)
        self.routes.add("GET", "/version", version)
        self.routes.add("GET", "/health", health)
        self.routes.add("GET", "/ready", self.ready)
        self.routes.add("GET", "/load", self.load)
        self.routes.add("GET", "/metrics", self.metrics)
        self.heap = HeapTrimmer()
        self.on_startup: list[Hook] = []
        self.on_shutdown: list[Hook] = []  # first thing on a stop, before draining
        self.on_cleanup: list[Hook] = []
        self.http = HTTPServer(self.routes, limits)

    @property
    def url(self) -> str:
        return self.http.url

    @property
    def port(self) -> int:
        return self.http.port

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        for hook in self.on_startup:
            await hook()
        try:
            await self.http.start(host, port, reuse_port=reuse_port, tls=tls)
        except BaseException:
            await self.cleanup()
            raise
        log.info("serving on %s", self.http.url)

    def start_draining(self) -> None:
        """/ready turns 503 and new requests are refused while requests in flight finish."""
        self.state.draining = True

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        for hook in self.on_shutdown:
            try:
                await hook()
            except Exception:
                log.exception("an engine server shutdown hook failed")
        self.start_draining()
        try:
            await self.http.stop(drain_timeout_s)
        finally:
            await self.cleanup()

    async def cleanup(self) -> None:
        for hook in self.on_cleanup:
            try:
                await hook()
            except Exception:
                log.exception("an engine server cleanup hook failed")

    async def __aenter__(self) -> EngineApp:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- routes -------------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response | Stream:
        try:
            req = parse_request(CompletionRequest, request.json())
            return await serve(request, self.state, await prepare(self.state, req, len(request.body)))
        finally:
            self.heap.request_done(len(request.body))

    async def chat_completions(self, request: Request) -> Response | Stream:
        try:
            req = parse_request(ChatCompletionRequest, request.json())
            return await serve(request, self.state, await prepare(self.state, req, len(request.body)))
        finally:
            self.heap.request_done(len(request.body))

    async def embeddings(self, request: Request) -> Response:
        req = parse_request(EmbeddingRequest, request.json())
        return Response.json(await embeddings(self.state, req, len(request.body)))

    def _card(self, name: str) -> dict[str, Any]:
        engine = self.state.engine
        return {
            "id": name,
            "object": "model",
            "created": self.started,
            "owned_by": "microserve",
            "root": engine.model_name,
            "max_model_len": engine.max_model_len,
            # how a chat answer is read for tool calls (the router reads answers it builds the same way)
            "tool_call_parser": syntax_for_template(getattr(engine.tokenizer, "chat_template", None)),
        }

    async def models(self, request: Request) -> Response:
        data = [self._card(name) for name in self.state.served_model_names]
        return Response.json({"object": "list", "data": data})

    async def model_card(self, request: Request) -> Response:
        name = unquote(request.path.removeprefix("/v1/models/"))
        return Response.json(self._card(self.state.resolve_model(name)))

    async def tokenize(self, request: Request) -> Response:
        req = parse_request(TokenizeRequest, request.json())
        self.state.resolve_model(req.model)
        tokenizer = self.state.engine.tokenizer
        text = functools.partial(_token_text, tokenizer)
        return Response.json(api_tokenize.tokenize(tokenizer, req, self.state.engine.max_model_len, text))

    async def detokenize(self, request: Request) -> Response:
        req = parse_request(DetokenizeRequest, request.json())
        self.state.resolve_model(req.model)
        tokenizer = self.state.engine.tokenizer
        return Response.json(api_tokenize.detokenize(tokenizer.decode, req, tokenizer.vocab_size))

    async def ready(self, request: Request) -> Response:
        is_ready = not self.state.draining and self.state.engine.is_ready()
        return Response.json({"ready": is_ready}, status=200 if is_ready else 503)

    async def load(self, request: Request) -> Response:
        return Response.json(self.state.engine.load())

    async def metrics(self, request: Request) -> Response:
        body, content_type = self.state.metrics.render(request.headers.get("accept"))
        return Response(body, content_type=content_type)


async def health(request: Request) -> Response:
    return Response.json({"status": "ok"})


async def version(request: Request) -> Response:
    return Response.json(api_tokenize.server_version())


def _token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id], skip_special_tokens=False))


def create_app(engine: ServingEngine, **kwargs: Any) -> EngineApp:
    """An app serving `engine` (see `EngineApp` for the options); `max_waiting` answers 503 once that
    many requests wait in the engine. A client hanging up cancels its handler, which aborts its engine
    request at once."""
    return EngineApp(engine, **kwargs)
