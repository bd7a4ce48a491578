"""The router's HTTP app: the OpenAI routes, /v1/models, health, readiness, metrics and the admin API.

Handlers parse, call one function and shape the answer; the request's way through lives in `dispatch.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from microserve.router import dispatch
from microserve.router.admin import ROUTER, add_admin_routes
from microserve.router.config import RouterConfig
from microserve.router.core import Router
from microserve.router.request import Route
from microserve.server.app import MAX_BODY_BYTES, error_middleware
from microserve.server.errors import json_response

log = logging.getLogger(__name__)

STARTED = web.AppKey("started", int)


def create_app(router: Router) -> web.Application:
    """An app around `router`; it starts the router's session and health checks with the app."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[ROUTER] = router
    app[STARTED] = int(time.time())
    app.router.add_post(Route.CHAT.value, chat_completions)
    app.router.add_post(Route.COMPLETIONS.value, completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    add_admin_routes(app)

    async def start(app: web.Application) -> None:
        await router.start()

    async def drain(app: web.Application) -> None:
        router.draining = True

    async def stop(app: web.Application) -> None:
        await router.close()

    app.on_startup.append(start)
    app.on_shutdown.append(drain)
    app.on_cleanup.append(stop)  # after requests in flight have drained
    return app


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await dispatch.handle(request.app[ROUTER], request, Route.CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await dispatch.handle(request.app[ROUTER], request, Route.COMPLETIONS)


async def models(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    created = request.app[STARTED]
    data = [
        {"id": model, "object": "model", "created": created, "owned_by": "microserve"}
        for model in router.pool.models()
    ]
    return json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready when at least one worker can take a request and the router is not shutting down."""
    router = request.app[ROUTER]
    available = 0 if router.draining else sum(1 for w in router.pool if w.available and w.models)
    return json_response(
        {"ready": available > 0, "workers_available": available}, status=200 if available else 503
    )


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[ROUTER].metrics.render(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


def run_router(config: RouterConfig) -> int:
    """Serve until SIGINT or SIGTERM, then let requests in flight finish (up to drain_timeout_s)."""
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    app = create_app(Router(config))
    url = f"http://{config.host}:{config.port}"
    web.run_app(
        app,
        host=config.host,
        port=config.port,
        loop=loop,
        handler_cancellation=True,
        shutdown_timeout=config.drain_timeout_s,
        access_log=None,  # one log line per request would cost more than the routing itself
        print=lambda *_: print(f"microserve router on {url}/v1", flush=True),
    )
    return 0
