"""One client request through the router: admission, the strategy with retries before the first byte,
the answer streamed out, and continuation on another engine when a stream breaks after that."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from microserve.api.errors import APIError
from microserve.api.sse import SSE_HEADERS, STATUS_CLIENT_CLOSED
from microserve.http.server import Request, Response, Stream
from microserve.router.client_errors import no_answer, stream_error_event, upstream_error
from microserve.router.fair_share import admit_now, admit_waiting
from microserve.router.recent import usage_of
from microserve.router.request import Route, RoutedRequest
from microserve.router.retry import backoff_s
from microserve.router.router import Router, no_worker_available
from microserve.router.strategies import Strategy, empty_answer
from microserve.router.tracing import RequestTrace
from microserve.router.upstream import BrokenStream, UpstreamHTTPError, WorkerFailure
from microserve.router.workers import NoWorkerAvailable
from microserve.tenants.cache import CACHE_HEADER, WHOLE, stream_events
from microserve.tenants.gateway import BYTES_PER_TOKEN, DEFAULT_RESERVE_TOKENS, Ticket
from microserve.tenants.keys import PRIORITIES, KeyRecord
from microserve.tenants.semantic import SEMANTIC_HIT, Probe
from microserve.tenants.usage import StreamMeter, usage_total


@dataclass(slots=True)
class Exchange:
    """One client request's state as it passes the steps of `handle`, read by `finish` at its end."""

    router: Router
    request: Request
    route: Route
    start: float = field(default_factory=time.perf_counter)
    status: int = 500
    req: RoutedRequest | None = None
    trace: RequestTrace | None = None
    key: KeyRecord | None = None
    ticket: Ticket | None = None
    tenant: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # headers the answer carries (limits, cache)
    cache_key: str | None = None
    probe: Probe | None = None  # the question's embedding, kept for the semantic cache with the answer
    hit: str = "hit"  # how a cached answer was found: exactly, or by meaning
    granted: int | None = None  # the admission ticket
    strategy: Strategy | None = None
    ttft: float | None = None
    used_tokens: int | None = None
    meter: StreamMeter | None = None


async def handle(router: Router, request: Request, route: Route) -> Response | Stream:
    """Answer one client request (JSON or SSE); errors before the first byte raise `APIError`."""
    ex = Exchange(router, request, route)
    if router.tracing is not None:
        ex.trace = RequestTrace(router.tracing, route, request.headers, ex.start)
    try:
        # A draining router still answers what arrives on its open connections (then closed by the
        # HTTP server): those requests were sent before the client could know; nothing new connects.
        if router.tenants is None and router.response_cache is None:  # no key, no cache: nothing to await
            req, stored = parsed(ex), None
        else:
            req, stored = await gate(ex)
        if stored is not None:  # no worker, no admission slot, no tokens
            ex.status, ex.used_tokens = 200, 0
            ex.ttft = time.perf_counter() - ex.start
            return await replay(request, stored, ex.extra, ex.hit)
        await admit_request(ex, req)
        return await answer(ex, req)
    except APIError as exc:
        ex.status = exc.status
        raise
    except (ConnectionResetError, asyncio.CancelledError):
        ex.status = STATUS_CLIENT_CLOSED
        raise
    finally:
        finish(ex)


async def gate(ex: Exchange) -> tuple[RoutedRequest, bytes | None]:
    """The key checked and its limits reserved, the request parsed; a cached answer when there is one."""
    router, request = ex.router, ex.request
    ex.key = key = await router.tenants.authenticate(request.headers) if router.tenants is not None else None
    req = parsed(ex)
    if key is not None and router.tenants is not None:
        ex.ticket = await router.tenants.admit(
            key, req.model, request.headers, len(request.body), req.max_tokens
        )
        ex.extra = dict(ex.ticket.headers)
        req.priority = ex.ticket.rank - PRIORITIES["normal"]  # the engines' order: high -1, normal 0, low 1
        ex.tenant = ex.ticket.tenant
    if router.response_cache is not None:
        ex.cache_key, stored = await router.response_cache.lookup(
            ex.tenant, ex.route.value, req.body, request.headers
        )
        if stored is None and ex.cache_key is not None and router.semantic_cache is not None:
            ex.probe, stored = await router.semantic_cache.lookup(
                ex.tenant, ex.route.value, req.body, request.headers
            )
            ex.hit = SEMANTIC_HIT
        if stored is not None:
            return req, stored
        ex.extra[CACHE_HEADER] = "miss"
    return req, None


def parsed(ex: Exchange) -> RoutedRequest:
    """The request parsed (after its key was checked: a stranger learns nothing of the body's faults)."""
    ex.req = req = ex.router.parse(ex.route, ex.request.body, ex.request.headers)
    if ex.trace is not None:
        req.trace = ex.trace
    return req


async def admit_request(ex: Exchange, req: RoutedRequest) -> None:
    """A slot in the admission queue (held while no worker is ready), then the model resolved and checked."""
    router = ex.router
    if ex.trace is not None and router.admission.full:  # a span only for a request that will wait
        ex.trace.admission_begins(router.admission.queued)
    rank, cost = admission_cost(req, ex.ticket, len(ex.request.body), router.fair_share.enabled)
    queued_at = time.perf_counter()
    fair, admission = router.fair_share, router.admission
    ex.granted = admit_now(fair, admission, ex.tenant, rank, cost)
    if ex.granted is None:
        ex.granted = await admit_waiting(fair, admission, ex.tenant, rank, cost, req.remaining_s())
    router.metrics.queue_wait.observe(time.perf_counter() - queued_at)
    router.resolve_model(req)
    if ex.trace is not None:
        ex.trace.admitted()
        ex.trace.parsed(req)
    if ex.key is not None and router.tenants is not None and req.model is not None:
        router.tenants.check_model(ex.key, req.model)


async def answer(ex: Exchange, req: RoutedRequest) -> Response | Stream:
    """The strategy run until its first bytes (retried meanwhile), then the answer whole or streamed."""
    router = ex.router
    ex.strategy = strategy = router.strategy  # a switch at run time applies to requests after it
    router.retry_budget.on_request()
    gen, first = await first_output(router, strategy, req)
    ex.ttft = time.perf_counter() - ex.start
    router.metrics.first_byte(ex.route, ex.ttft)
    if gen is None:
        ex.status = 200
        req.usage = usage_of(first)
        if ex.ticket is not None:
            ex.used_tokens = usage_total(first)
        if ex.cache_key is not None:
            await keep(router, ex.cache_key, ex.probe, False, first)
        return Response(first, headers=ex.extra)
    extra = ex.extra
    response = await ex.request.stream(headers={**SSE_HEADERS, **extra} if extra else SSE_HEADERS)
    ex.status = 200
    sent: list[bytes] | None = [] if ex.cache_key is not None else None
    if ex.ticket is not None:
        ex.meter = StreamMeter()
    if ex.meter is not None or sent is not None:
        response.tap = functools.partial(_tap, ex.meter, sent)
    await stream_out(router, strategy, req, response, gen, first)
    if ex.cache_key is not None and sent is not None:
        await keep(router, ex.cache_key, ex.probe, True, b"".join(sent))
    return response


def finish(ex: Exchange) -> None:
    """Whatever the request held given back, its token use settled, and it counted, recorded and traced."""
    router, req = ex.router, ex.req
    if req is not None:
        for handle in req.handles:  # a strategy may pick a worker and never call it
            handle.release()
    if ex.granted is not None:
        router.admission.release(ex.granted)
        router.fair_share.running(ex.tenant, -1)
    if ex.ticket is not None and router.tenants is not None:
        if ex.meter is not None:
            ex.used_tokens = ex.meter.total(ex.ticket.prompt_estimate)
        # Nothing answered costs no tokens; a whole answer without usage keeps its reservation.
        router.tenants.finish(ex.ticket, 0 if ex.used_tokens is None and ex.status != 200 else ex.used_tokens)
    e2e = time.perf_counter() - ex.start
    router.metrics.request_done(ex.route, ex.status, e2e if ex.ttft is not None else None)
    record(router, ex.route, req, ex.strategy, ex.status, ex.ttft, e2e)
    if ex.trace is not None:
        ex.trace.finish(ex.status, req)


_NORMAL = PRIORITIES["normal"]


def admission_cost(
    req: RoutedRequest, ticket: Ticket | None, body_bytes: int, fair: bool = True
) -> tuple[int, int]:
    """(priority rank, tokens) the request queues with: its key's class and reservation (the tokens only
    count for fair sharing: 0 without it)."""
    if ticket is not None:
        return ticket.rank, ticket.grant.reserved
    if not fair:
        return _NORMAL, 0
    return _NORMAL, body_bytes // BYTES_PER_TOKEN + (req.max_tokens or DEFAULT_RESERVE_TOKENS)


def _tap(meter: StreamMeter | None, sent: list[bytes] | None, chunk: bytes) -> None:
    if meter is not None:
        meter.observe(chunk)
    if sent is not None:
        sent.append(chunk)


async def keep(router: Router, key: str, probe: Probe | None, stream: bool, answer: bytes) -> None:
    """Store a complete answer in the exact cache and, once kept there, index it for the semantic one."""
    if router.response_cache is None or not await router.response_cache.store(key, stream, answer):
        return
    if probe is not None and router.semantic_cache is not None:
        await router.semantic_cache.remember(probe, key)


async def replay(
    request: Request, stored: bytes, headers: dict[str, str], hit: str = "hit"
) -> Response | Stream:
    """A cached answer, whole or as the stream of events it was first sent as."""
    headers = {**headers, CACHE_HEADER: hit}
    if stored[:1] == WHOLE:
        return Response(stored[1:], headers=headers)
    response = await request.stream(headers={**SSE_HEADERS, **headers})
    for event in stream_events(stored[1:]):
        await response.write(event)
    return response


def record(
    router: Router,
    route: Route,
    req: RoutedRequest | None,
    strategy: Strategy | None,
    status: int,
    ttft: float | None,
    e2e: float,
) -> None:
    """Keep the request in the router's recent-request ring (for /dashboard)."""
    name = "" if strategy is None else strategy.name or type(strategy).__name__
    if req is None:
        router.recent.record(route, None, name, status, False, ttft, e2e)
        return
    router.recent.record(
        route,
        req.model,
        name,
        status,
        req.stream,
        ttft,
        e2e,
        req.output_tokens,
        req.cached_tokens,
        req.hops,
        req.usage,
    )


async def first_output(
    router: Router, strategy: Strategy, req: RoutedRequest
) -> tuple[AsyncIterator[bytes] | None, bytes]:
    """Run the strategy until it yields; retry on another worker while nothing reached the client.

    A non-streamed answer is collected whole inside the retry loop (nothing is sent before it is
    complete), so it is retried even when a worker dies half-way. Returns (rest of stream | None, bytes).
    """
    attempts = 0
    name = strategy.name or type(strategy).__name__

    async def attempt() -> tuple[AsyncIterator[bytes] | None, bytes]:
        nonlocal attempts
        if req.trace is not None:
            req.trace.attempt(attempts, name)
        attempts += 1
        gen = None
        try:
            if not req.stream:  # a coroutine: no generator to drive for the common whole answer
                return None, await strategy.serve_whole(req)
            gen = strategy.serve(req)
            return gen, await anext(gen)
        except StopAsyncIteration:
            raise empty_answer() from None
        except (WorkerFailure, NoWorkerAvailable) as exc:
            # A generator that raised is finished already; this only matters for one that yielded nothing.
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()
            if req.trace is not None and isinstance(exc, WorkerFailure):
                req.trace.attempt_failed(exc.worker, exc.message)
            raise

    try:
        return await router.retry_loop.run(req, attempt)
    except WorkerFailure as exc:
        if isinstance(exc, UpstreamHTTPError) and not exc.retryable:
            raise upstream_error(exc, req.id) from None
        raise no_answer(exc, req.id) from None
    except NoWorkerAvailable as exc:
        raise no_worker_available(str(exc)) from None


async def stream_out(
    router: Router,
    strategy: Strategy,
    req: RoutedRequest,
    response: Stream,
    gen: AsyncIterator[bytes],
    first: bytes,
) -> None:
    async with aclosing(gen):  # type: ignore[type-var]
        try:
            await response.write(first)
            async for chunk in gen:
                await response.write(chunk)
            return
        except BrokenStream as exc:
            broken = exc
        except (WorkerFailure, NoWorkerAvailable) as exc:
            await response.write(stream_error_event("The answer failed mid-stream", str(exc), req.id))
            return
    await continue_stream(router, strategy, req, response, broken)


async def continue_stream(
    router: Router, strategy: Strategy, req: RoutedRequest, response: Stream, broken: BrokenStream
) -> None:
    """Resume a broken stream on other engines until it completes, or end it with an SSE error event."""
    outcome = router.metrics.continuations
    while True:
        progress = broken.progress
        req.excluded.add(broken.worker.url)
        if progress is None or not broken.resumable:
            await write_error(response, req, "The worker failed mid-stream", broken)
            return
        if progress.continuations >= router.config.max_continuations or req.remaining_s() <= 0:
            outcome.labels("gave_up").inc()
            await write_error(response, req, "The stream could not be continued", broken)
            return
        progress.continuations += 1
        if req.trace is not None:
            req.trace.continuation(progress.continuations, broken.worker, broken.message, progress.delivered)
        try:
            async with aclosing(strategy.resume(req, broken)) as rest:  # type: ignore[type-var]
                async for chunk in rest:
                    await response.write(chunk)
            outcome.labels("completed").inc()
            return
        except BrokenStream as exc:
            broken = exc
        except WorkerFailure as exc:  # the new worker failed before it sent anything
            broken = BrokenStream(exc.worker, exc.message, progress)
        except NoWorkerAvailable as exc:
            outcome.labels("no_worker").inc()
            await response.write(
                stream_error_event("No engine left to continue the stream", str(exc), req.id)
            )
            return
        delay = backoff_s(progress.continuations, router.config.retry, router.rng)
        await asyncio.sleep(min(delay, max(0.0, req.remaining_s())))


async def write_error(response: Stream, req: RoutedRequest, what: str, broken: BrokenStream) -> None:
    # No [DONE] after it: the client must see that the stream did not complete.
    detail = f"{broken.worker.url}: {broken.message}"
    await response.write(stream_error_event(what, detail, req.id))
