"""The engine's HTTP server: OpenAI routes, health, readiness, load and Prometheus metrics on aiohttp.

Handlers only parse, call one function and shape the answer; the work lives in `handlers.py`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from microserve.api import tokenize as api_tokenize
from microserve.api.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from microserve.api.sse import STATUS_CLIENT_CLOSED
from microserve.api.tokenize import DetokenizeRequest, TokenizeRequest
from microserve.server import errors
from microserve.server.errors import APIError, bad_request, json_response
from microserve.server.handlers import ServerState, ServingEngine, prepare, serve
from microserve.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

STATE = web.AppKey("state", ServerState)
STARTED = web.AppKey("started", int)

# aiohttp's 1 MiB default is too small for long-context prompts, above all as JSON lists of token ids.
MAX_BODY_BYTES = 64 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    engine: ServingEngine,
    *,
    served_model_names: list[str] | None = None,
    max_waiting: int | None = None,
) -> web.Application:
    """An app serving `engine`; `max_waiting` answers 503 once that many requests wait in the engine.

    Serve it with handler cancellation on (as `run_server` does) so that a client hanging up aborts its
    engine request at once; without it, the server notices at the next output.
    """
    names = list(served_model_names or [engine.model_name])
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[STATE] = ServerState(
        engine=engine,
        served_model_names=names,
        metrics=ServerMetrics(engine.load, names[0]),
        max_waiting=max_waiting,
    )
    app[STARTED] = int(time.time())
    app.on_shutdown.append(_start_draining)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model_card)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/version", version)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/load", load)
    app.router.add_get("/metrics", metrics)
    return app


async def completions(request: web.Request) -> web.StreamResponse:
    body, size = await read_json(request)
    req = parse_request(CompletionRequest, body)
    state = request.app[STATE]
    return await serve(request, state, await prepare(state, req, size))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body, size = await read_json(request)
    req = parse_request(ChatCompletionRequest, body)
    state = request.app[STATE]
    return await serve(request, state, await prepare(state, req, size))


def _card(request: web.Request, name: str) -> dict[str, Any]:
    state = request.app[STATE]
    return {
        "id": name,
        "object": "model",
        "created": request.app[STARTED],
        "owned_by": "microserve",
        "root": state.engine.model_name,
        "max_model_len": state.engine.max_model_len,
    }


async def models(request: web.Request) -> web.Response:
    data = [_card(request, name) for name in request.app[STATE].served_model_names]
    return json_response({"object": "list", "data": data})


async def model_card(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    return json_response(_card(request, request.app[STATE].resolve_model(name)))


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    req = parse_request(TokenizeRequest, (await read_json(request))[0])
    state.resolve_model(req.model)
    tokenizer = state.engine.tokenizer
    text = functools.partial(_token_text, tokenizer)
    return json_response(api_tokenize.tokenize(tokenizer, req, state.engine.max_model_len, text))


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    req = parse_request(DetokenizeRequest, (await read_json(request))[0])
    state.resolve_model(req.model)
    tokenizer = state.engine.tokenizer
    return json_response(api_tokenize.detokenize(tokenizer.decode, req, tokenizer.vocab_size))


async def version(request: web.Request) -> web.Response:
    return json_response(api_tokenize.server_version())


def _token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id], skip_special_tokens=False))


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    is_ready = not state.draining and state.engine.is_ready()
    return json_response({"ready": is_ready}, status=200 if is_ready else 503)


async def load(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].engine.load())


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[STATE].metrics.render(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def read_json(request: web.Request) -> tuple[Any, int]:
    """The decoded JSON body and its size in bytes; malformed or oversized bodies are 4xx."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise APIError(413, f"The request body exceeds {MAX_BODY_BYTES} bytes.") from None
    if not raw:
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        return orjson.loads(raw), len(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as an OpenAI-shaped error, and the server keeps serving."""
    try:
        return await handler(request)
    except APIError as exc:
        return errors.error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # Unknown route, wrong method…: same shape as every other error, keeping headers such as Allow.
        message = f"{exc.reason}: {request.method} {request.path}"
        headers = {
            k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")
        }
        return errors.error_response(APIError(exc.status, message, headers=headers))
    except ConnectionResetError:
        return web.Response(status=STATUS_CLIENT_CLOSED)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return errors.error_response(errors.internal_error())


async def _start_draining(app: web.Application) -> None:
    # /ready turns 503 and new requests are refused while requests in flight finish.
    app[STATE].draining = True


def run_server(app: web.Application, host: str, port: int, *, shutdown_timeout: float = 30.0) -> None:
    """Serve `app` until SIGINT or SIGTERM, then drain requests in flight for up to `shutdown_timeout` s."""
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(
        app,
        host=host,
        port=port,
        loop=loop,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
        # One log line per request costs more than routing it; keep them for debugging only.
        access_log=logging.getLogger("aiohttp.access") if log.isEnabledFor(logging.DEBUG) else None,
        print=lambda *_: log.info("serving on http://%s:%d", host, port),
    )
