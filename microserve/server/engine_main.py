"""`microserve engine`: build the engine, serve its HTTP API, stop cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging

from aiohttp import web

from microserve.engine.async_engine import AsyncEngine
from microserve.engine.builder import build_engine
from microserve.engine.config import EngineConfig
from microserve.server.app import create_app, run_server
from microserve.server.microserving import add_microserving_routes

log = logging.getLogger(__name__)


def engine_app(engine: AsyncEngine, internal_token: str | None = None) -> web.Application:
    """The engine's app, with the stepping thread started and stopped alongside the server."""
    app = create_app(engine)  # the engine itself refuses work beyond its max_waiting
    add_microserving_routes(app, engine, internal_token)

    async def start(_: web.Application) -> None:
        engine.start()

    async def stop(_: web.Application) -> None:
        await engine.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def run_engine(config: EngineConfig, host: str, port: int, internal_token: str | None = None) -> int:
    engine = build_engine(config)
    app = engine_app(engine, internal_token)
    print(f"microserve engine ({config.backend}, {engine.model_name}) on http://{host}:{port}", flush=True)
    run_server(app, host, port)
    return 0
