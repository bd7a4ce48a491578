"""`microserve engine`: build the engine, serve its HTTP API, stop cleanly on Ctrl-C or SIGTERM.

The model steps on the main thread (torch's CPU kernels run fastest there) and the HTTP server's event
loop on a second thread. A signal drains the requests in flight, then stops the stepping loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from microserve.engine.async_engine import AsyncEngine
from microserve.engine.config import EngineConfig
from microserve.engine.scheduler import SchedulerConfig
from microserve.engine_builder import build_engine
from microserve.registry.args import RegisterOptions
from microserve.registry.record import Registration
from microserve.registry.register import Registrar
from microserve.server.app import create_app
from microserve.server.errors import APIError
from microserve.server.microserving import add_microserving_routes
from microserve.tokens import bearer_matches

log = logging.getLogger(__name__)


def engine_app(
    engine: AsyncEngine,
    internal_token: str | None = None,
    *,
    own_thread: bool = True,
    metrics_token: str | None = None,
) -> web.Application:
    """The engine's app. With `own_thread`, the app starts and stops the engine's stepping thread;
    otherwise the caller steps it (`AsyncEngine.run_blocking`) and the app only stops it. With
    `metrics_token`, /metrics answers only requests that carry it."""
    app = create_app(engine)  # the engine itself refuses work beyond its max_waiting
    add_microserving_routes(app, engine, internal_token)
    if metrics_token:
        app.middlewares.append(_metrics_token(metrics_token))

    async def start(_: web.Application) -> None:
        engine.start()

    async def stop(_: web.Application) -> None:
        await engine.stop()

    if own_thread:
        app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def _metrics_token(token: str):  # type: ignore[no-untyped-def]
    @web.middleware
    async def require(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/metrics" and not bearer_matches(request.headers.get("Authorization"), token):
            return APIError(401, "/metrics needs the metrics token.", code="unauthorized").response()
        return await handler(request)

    return require


class ServerThread:
    """An aiohttp app served from an event loop on a background thread."""

    def __init__(self, app: web.Application, host: str, port: int, shutdown_timeout: float = 30.0) -> None:
        self.loop = _new_loop()
        self._app, self._host, self._port, self._timeout = app, host, port, shutdown_timeout
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="http", daemon=True)

    def start(self) -> None:
        """Return once the server listens; raises what stopped it from listening."""
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def request_stop(self) -> None:
        """Thread-safe, also from a signal handler: drain requests in flight, then clean up."""
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)

    def join(self) -> None:
        self._thread.join()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(
            self._app,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=self._timeout,
            # One log line per request costs more than serving it; keep them for debugging only.
            access_log=logging.getLogger("aiohttp.access") if log.isEnabledFor(logging.DEBUG) else None,
        )
        try:
            await runner.setup()
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException as exc:
            self._error = exc
            self._started.set()
            await runner.cleanup()
            return
        self._started.set()
        await self._stop.wait()
        await runner.cleanup()  # on_shutdown (drain) then on_cleanup (stops the engine)


def run_engine(
    config: EngineConfig,
    host: str,
    port: int,
    internal_token: str | None = None,
    metrics_token: str | None = None,
    register: RegisterOptions | None = None,
) -> int:
    engine = build_engine(config)
    app = engine_app(engine, internal_token, own_thread=False, metrics_token=metrics_token)
    if register is not None:
        add_registration(app, registrar(engine, config, register), engine.is_ready)
    server = ServerThread(app, host, port)
    server.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.request_stop())
    print(f"microserve engine ({config.backend}, {engine.model_name}) on http://{host}:{port}", flush=True)
    engine.run_blocking(server.loop)  # returns once the server's cleanup stopped the engine
    server.join()
    return 0


def registrar(engine: AsyncEngine, config: EngineConfig, options: RegisterOptions) -> Registrar:
    """This engine's record: what the flags say, plus the model it serves and its capacity."""
    load = engine.load()
    scheduler = config.scheduler or SchedulerConfig()
    record = Registration(
        url=options.url,
        models=(engine.model_name,),
        role=options.role,
        labels=options.labels,
        capacity={
            "max_num_seqs": scheduler.max_num_seqs,
            "max_num_batched_tokens": scheduler.max_num_batched_tokens,
            "max_model_len": engine.max_model_len,
            "kv_blocks_total": int(load["kv_blocks_total"]),
            "block_size": int(load["block_size"]),
        },
    )
    return Registrar(options.target, record, options.ttl_s)


def add_registration(app: web.Application, registrar: Registrar, ready: Callable[[], bool]) -> None:
    """Register once the engine is ready (it listens and steps); withdraw first thing on a graceful stop,
    before draining, so routers stop sending new requests while those in flight finish here."""

    async def start(_: web.Application) -> None:
        registrar.start(when=ready)

    async def withdraw(_: web.Application) -> None:
        await registrar.withdraw()

    app.on_startup.append(start)
    app.on_shutdown.insert(0, withdraw)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
