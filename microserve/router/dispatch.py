"""One client request through the router: admission, the strategy with retries before the first byte,
the answer streamed out, and continuation on another engine when a stream breaks after that."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from microserve.api.errors import APIError
from microserve.api.sse import SSE_HEADERS, STATUS_CLIENT_CLOSED
from microserve.http.server import Request, Response, Stream
from microserve.router.client_errors import no_answer, stream_error_event, upstream_error
from microserve.router.fair_share import admit
from microserve.router.recent import usage_tokens
from microserve.router.request import Route, RoutedRequest
from microserve.router.retry import backoff_s
from microserve.router.router import Router, no_worker_available
from microserve.router.strategies import Strategy
from microserve.router.tracing import RequestTrace
from microserve.router.upstream import BrokenStream, UpstreamHTTPError, WorkerFailure
from microserve.router.workers import NoWorkerAvailable
from microserve.tenants.cache import CACHE_HEADER, WHOLE, stream_events
from microserve.tenants.gateway import BYTES_PER_TOKEN, DEFAULT_RESERVE_TOKENS, Ticket
from microserve.tenants.keys import PRIORITIES
from microserve.tenants.semantic import SEMANTIC_HIT, Probe
from microserve.tenants.usage import StreamMeter, usage_total


async def handle(router: Router, request: Request, route: Route) -> Response | Stream:
    """Answer one client request (JSON or SSE); errors before the first byte raise `APIError`."""
    start = time.perf_counter()
    status = 500
    granted: int | None = None  # the admission ticket
    ttft: float | None = None
    req: RoutedRequest | None = None
    strategy: Strategy | None = None
    trace = None if router.tracing is None else RequestTrace(router.tracing, route, request.headers, start)
    ticket: Ticket | None = None
    used_tokens: int | None = None
    meter: StreamMeter | None = None
    try:
        # A draining router still answers what arrives on its open connections (then closed by the
        # HTTP server): those requests were sent before the client could know; nothing new connects.
        key = await router.tenants.authenticate(request.headers) if router.tenants is not None else None
        req = router.parse(route, request.body, request.headers)
        if trace is not None:
            req.trace = trace
        if key is not None and router.tenants is not None:
            ticket = await router.tenants.admit(
                key, req.model, request.headers, len(request.body), req.max_tokens
            )
        extra = dict(ticket.headers) if ticket is not None else {}
        if ticket is not None:  # the engines' scheduler order: high -1, normal 0, low 1
            req.priority = ticket.rank - PRIORITIES["normal"]
        tenant = ticket.tenant if ticket is not None else ""
        cache_key: str | None = None
        probe: Probe | None = None
        if router.response_cache is not None:
            cache_key, stored = await router.response_cache.lookup(
                tenant, route.value, req.body, request.headers
            )
            hit = "hit"
            if stored is None and cache_key is not None and router.semantic_cache is not None:
                probe, stored = await router.semantic_cache.lookup(
                    tenant, route.value, req.body, request.headers
                )
                hit = SEMANTIC_HIT
            if stored is not None:  # no worker, no admission slot, no tokens
                status, used_tokens = 200, 0
                ttft = time.perf_counter() - start
                return await replay(request, stored, extra, hit)
            extra[CACHE_HEADER] = "miss"
        if trace is not None and router.admission.full:  # a span only for a request that will wait
            trace.admission_begins(router.admission.queued)
        # While no worker is ready this holds the request until one is (or its queue timeout passes).
        rank, cost = admission_cost(req, ticket, len(request.body))
        queued_at = time.perf_counter()
        granted = await admit(router.fair_share, router.admission, tenant, rank, cost, req.remaining_s())
        router.metrics.queue_wait.observe(time.perf_counter() - queued_at)
        router.resolve_model(req)
        if trace is not None:
            trace.admitted()
            trace.parsed(req)
        if key is not None and router.tenants is not None and req.model is not None:
            router.tenants.check_model(key, req.model)
        strategy = router.strategy  # a switch at run time applies to the requests that arrive after it
        router.retry_budget.on_request()
        gen, first = await first_output(router, strategy, req)
        ttft = time.perf_counter() - start
        router.metrics.first_byte(route, ttft)
        if gen is None:
            status = 200
            req.output_tokens, req.cached_tokens = usage_tokens(first)
            if ticket is not None:
                used_tokens = usage_total(first)
            if cache_key is not None:
                await keep(router, cache_key, probe, False, first)
            return Response(first, headers=extra)
        response = await request.stream(headers={**SSE_HEADERS, **extra} if extra else SSE_HEADERS)
        status = 200
        sent: list[bytes] | None = [] if cache_key is not None else None
        if ticket is not None:
            meter = StreamMeter()
        if meter is not None or sent is not None:
            response.tap = functools.partial(_tap, meter, sent)
        await stream_out(router, strategy, req, response, gen, first)
        if cache_key is not None and sent is not None:
            await keep(router, cache_key, probe, True, b"".join(sent))
        return response
    except APIError as exc:
        status = exc.status
        raise
    except (ConnectionResetError, asyncio.CancelledError):
        status = STATUS_CLIENT_CLOSED
        raise
    finally:
        if req is not None:
            for handle in req.handles:  # a strategy may pick a worker and never call it
                handle.release()
        if granted is not None:
            router.admission.release(granted)
            router.fair_share.running(tenant, -1)
        if ticket is not None and router.tenants is not None:
            if meter is not None:
                used_tokens = meter.total(ticket.prompt_estimate)
            # Nothing answered costs no tokens; a whole answer without usage keeps its reservation.
            router.tenants.finish(ticket, 0 if used_tokens is None and status != 200 else used_tokens)
        e2e = time.perf_counter() - start
        router.metrics.request_done(route, status, e2e if ttft is not None else None)
        record(router, route, req, strategy, status, ttft, e2e)
        if trace is not None:
            trace.finish(status, req)


def admission_cost(req: RoutedRequest, ticket: Ticket | None, body_bytes: int) -> tuple[int, int]:
    """(priority rank, tokens) the request queues with: its key's class and reservation."""
    if ticket is not None:
        return ticket.rank, ticket.grant.reserved
    return PRIORITIES["normal"], body_bytes // BYTES_PER_TOKEN + (req.max_tokens or DEFAULT_RESERVE_TOKENS)


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
        gen = strategy.serve(req)
        try:
            if req.stream:
                return gen, await anext(gen)
            return None, b"".join([chunk async for chunk in gen])
        except StopAsyncIteration:
            raise APIError(502, "The strategy ended without an answer.", code="empty_answer") from None
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
