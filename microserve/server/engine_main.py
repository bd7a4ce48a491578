"""`microserve engine`: build the engine, serve its HTTP API, stop cleanly on Ctrl-C or SIGTERM.

The model steps on the main thread (torch's CPU kernels run fastest there) and the HTTP server's event
loop on a second thread. A signal drains the requests in flight, then stops the stepping loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import threading
from collections.abc import Callable

from microserve.api.errors import APIError
from microserve.engine.async_engine import AsyncEngine
from microserve.engine.config import EngineConfig
from microserve.engine.scheduler import SchedulerConfig
from microserve.engine_builder import build_engine
from microserve.http.limits import ConnectionLimits, raise_descriptor_limit
from microserve.http.server import Handler, Request, Response, Stream
from microserve.http.tls import EngineTLS
from microserve.registry.args import RegisterOptions
from microserve.registry.record import Registration
from microserve.registry.register import Registrar
from microserve.server.app import EngineApp, create_app
from microserve.server.microserving import add_microserving_routes
from microserve.tokens import bearer_matches
from microserve.tracing import Tracing

log = logging.getLogger(__name__)


def engine_app(
    engine: AsyncEngine,
    internal_token: str | None = None,
    *,
    own_thread: bool = True,
    metrics_token: str | None = None,
    tracing: Tracing | None = None,
    limits: ConnectionLimits | None = None,
    max_body_bytes: int | None = None,
    peer_tls: ssl.SSLContext | None = None,
) -> EngineApp:
    """The engine's app. With `own_thread`, the app starts and stops the engine's stepping thread;
    otherwise the caller steps it (`AsyncEngine.run_blocking`) and the app only stops it. With
    `metrics_token`, /metrics answers only requests that carry it. With `tracing`, it sends spans, and
    flushes them as it stops."""
    # The engine itself refuses work beyond its max_waiting.
    app = create_app(engine, limits=limits, max_body_bytes=max_body_bytes, tracing=tracing)
    add_microserving_routes(app, engine, internal_token, peer_tls)
    if metrics_token:
        app.routes.add("GET", "/metrics", _metrics_token(metrics_token, app.metrics))

    async def start() -> None:
        engine.start()

    if own_thread:
        app.on_startup.append(start)
    app.on_cleanup.append(engine.stop)
    if tracing is not None:

        async def flush() -> None:
            await asyncio.to_thread(tracing.shutdown)

        app.on_cleanup.append(flush)
    return app


def _metrics_token(token: str, metrics: Handler) -> Handler:
    async def require(request: Request) -> Response | Stream:
        if not bearer_matches(request.headers.get("authorization"), token):
            raise APIError(401, "/metrics needs the metrics token.", code="unauthorized")
        return await metrics(request)

    return require


class ServerThread:
    """An engine app served from an event loop on a background thread."""

    def __init__(
        self,
        app: EngineApp,
        host: str,
        port: int,
        shutdown_timeout: float = 30.0,
        *,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.loop = _new_loop()
        self._tls = tls
        self._app, self._host, self._port, self._timeout = app, host, port, shutdown_timeout
        self._reuse_port = reuse_port
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
        try:
            await self._app.start(self._host, self._port, reuse_port=self._reuse_port, tls=self._tls)
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        await self._stop.wait()
        await self._app.stop(self._timeout)  # drain, then the cleanup hooks (which stop the engine)


def run_engine(
    config: EngineConfig,
    host: str,
    port: int,
    internal_token: str | None = None,
    metrics_token: str | None = None,
    register: RegisterOptions | None = None,
    *,
    limits: ConnectionLimits | None = None,
    max_body_bytes: int | None = None,
    drain_timeout_s: float = 30.0,
    reuse_port: bool = False,
    tls: EngineTLS | None = None,
) -> int:
    # Before the model loads, so that a bad setting fails fast (a certificate that does not load, too).
    scheme = "https" if tls is not None else "http"
    server_tls, peer_tls = (tls.server(), tls.client()) if tls is not None else (None, None)
    tracing = Tracing.from_env("microserve-engine", f"{scheme}://{host}:{port}")
    raise_descriptor_limit()
    engine = build_engine(config)
    app = engine_app(
        engine,
        internal_token,
        own_thread=False,
        metrics_token=metrics_token,
        tracing=tracing,
        limits=limits,
        max_body_bytes=max_body_bytes,
        peer_tls=peer_tls,
    )
    if register is not None:
        add_registration(app, registrar(engine, config, register), engine.is_ready)
    server = ServerThread(app, host, port, drain_timeout_s, reuse_port=reuse_port, tls=server_tls)
    server.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.request_stop())
    print(
        f"microserve engine ({config.backend}, {engine.model_name}) on {scheme}://{host}:{port}", flush=True
    )
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


def add_registration(app: EngineApp, registrar: Registrar, ready: Callable[[], bool]) -> None:
    """Register once the engine is ready (it listens and steps); withdraw first thing on a graceful stop,
    before draining, so routers stop sending new requests while those in flight finish here."""

    async def start() -> None:
        registrar.start(when=ready)

    app.on_startup.append(start)
    app.on_shutdown.insert(0, registrar.withdraw)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
