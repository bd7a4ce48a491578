"""One client request through the router: admission, the strategy with retries before the first byte,
the answer streamed out, and continuation on another engine when a stream breaks after that."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from microserve.api.errors import APIError
from microserve.api.sse import SSE_HEADERS, STATUS_CLIENT_CLOSED
from microserve.http.server import Request, Response, Stream
from microserve.router.client_errors import no_answer, stream_error_event, upstream_error
from microserve.router.recent import usage_tokens
from microserve.router.request import Route, RoutedRequest
from microserve.router.retry import backoff_s
from microserve.router.router import Router, no_worker_available
from microserve.router.strategies import Strategy
from microserve.router.upstream import BrokenStream, UpstreamHTTPError, WorkerFailure
from microserve.router.workers import NoWorkerAvailable


async def handle(router: Router, request: Request, route: Route) -> Response | Stream:
    """Answer one client request (JSON or SSE); errors before the first byte raise `APIError`."""
    start = time.perf_counter()
    status, granted = 500, None
    ttft: float | None = None
    req: RoutedRequest | None = None
    strategy: Strategy | None = None
    try:
        # A draining router still answers what arrives on its open connections (then closed by the
        # HTTP server): those requests were sent before the client could know; nothing new connects.
        req = router.parse(route, request.body, request.headers)
        # While no worker is ready this holds the request until one is (or its queue timeout passes).
        granted = await router.admission.acquire(timeout_s=req.remaining_s())
        router.resolve_model(req)
        strategy = router.strategy  # a switch at run time applies to the requests that arrive after it
        router.retry_budget.on_request()
        gen, first = await first_output(router, strategy, req)
        ttft = time.perf_counter() - start
        router.metrics.first_byte(route, ttft)
        if gen is None:
            status = 200
            req.output_tokens, req.cached_tokens = usage_tokens(first)
            return Response(first)
        response = await request.stream(headers=SSE_HEADERS)
        status = 200
        await stream_out(router, strategy, req, response, gen, first)
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
        e2e = time.perf_counter() - start
        router.metrics.request_done(route, status, e2e if ttft is not None else None)
        record(router, route, req, strategy, status, ttft, e2e)


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

    async def attempt() -> tuple[AsyncIterator[bytes] | None, bytes]:
        gen = strategy.serve(req)
        try:
            if req.stream:
                return gen, await anext(gen)
            return None, b"".join([chunk async for chunk in gen])
        except StopAsyncIteration:
            raise APIError(502, "The strategy ended without an answer.", code="empty_answer") from None
        except (WorkerFailure, NoWorkerAvailable):
            # A generator that raised is finished already; this only matters for one that yielded nothing.
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()
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
