"""Calls from the router to one worker: `HTTPWorkerHandle` is the `WorkerHandle` a strategy holds.

Non-streamed answers and untracked streams pass through as bytes; streams from microserve engines are
tracked (token ids asked for, then stripped) so that they can continue elsewhere if the engine dies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from microserve.api.errors import APIError
from microserve.api.tool_calls import SSEToolCalls, chat_tool_calls
from microserve.engine_client import EngineClient, EngineError, KVAddress
from microserve.http.client import ClientError, ConnectFailed, HTTPClient, ReadStalled, Response
from microserve.router.continuation import (
    StreamProgress,
    UpstreamStreamError,
    holds_back,
    sampling_fields,
    split_frames,
    whole_as_client,
)
from microserve.router.deadlines import AttemptDeadlines, DeadlineConfig, attempt_deadlines
from microserve.router.request import Route, RoutedRequest
from microserve.router.tracing import call_span
from microserve.router.worker_handle import WorkerHandle
from microserve.router.workers import KIND_MICROSERVE, PickedWorker, Worker, WorkerKind


class WorkerFailure(Exception):
    """An attempt on a worker failed in a way another worker may not: the router may retry elsewhere."""

    def __init__(self, worker: Worker, message: str) -> None:
        super().__init__(f"{worker.url}: {message}")
        self.worker = worker
        self.message = message


class WorkerUnreachable(WorkerFailure):
    """No connection to the worker could be made: it is down, so it leaves the pool until a health
    check passes again (/ready says so at once, and the client hears 503 with Retry-After)."""


class UpstreamHTTPError(WorkerFailure):
    """The worker answered with an error status before any byte of an answer."""

    def __init__(self, worker: Worker, status: int, body: bytes, headers: dict[str, str]) -> None:
        super().__init__(worker, f"HTTP {status}")
        self.status = status
        self.body = body
        self.headers = headers

    @property
    def retryable(self) -> bool:
        # 4xx other than 429 is the client's mistake: another worker would say the same.
        return self.status >= 500 or self.status == 429

    @property
    def code(self) -> str | None:
        try:
            code: str | None = orjson.loads(self.body)["error"].get("code")
            return code
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return None


class BrokenStream(WorkerFailure):
    """A stream died after it started; `progress` (tracked streams only) says how to continue it."""

    def __init__(self, worker: Worker, message: str, progress: StreamProgress | None) -> None:
        super().__init__(worker, message)
        self.progress = progress

    @property
    def resumable(self) -> bool:
        return self.progress is not None and self.progress.resumable


# A worker that is there but busy or starting says so with these; it is not unwell.
_NOT_A_FAILURE = {429, 503}
_NETWORK_ERRORS = (ClientError, TimeoutError, ConnectionError)


def _unreachable(worker: Worker, exc: BaseException) -> WorkerFailure:
    """The failure to raise for a network error on `worker` (already recorded as a connect failure).
    Only a refused connection or an unreachable host (ConnectFailed) says the worker is down; this
    process out of descriptors or ports says nothing about it."""
    if isinstance(exc, ConnectFailed):
        worker.mark_unreachable()
        return WorkerUnreachable(worker, f"cannot connect to the worker: {exc!r}")
    return WorkerFailure(worker, f"cannot reach the worker: {exc!r}")


@dataclass(slots=True)
class Upstream:
    """What every handle shares: the HTTP clients, the tokens, the timeouts, the decoder for resumes.

    Both clients are the lean one (microserve/http/client.py): `http` carries the requests' own traffic;
    `control` the microserving verbs, health checks and load polls, in a pool of their own so that a
    saturated hot path (every connection slot taken) never starves a health check into a false failure.
    """

    http: HTTPClient
    control: HTTPClient
    internal_token: str | None = None
    connect_timeout_s: float = 5.0
    track_streams: bool = True
    decoder: Callable[[str | None], Any] | None = None  # async: model -> decode(ids) or None
    deadlines: DeadlineConfig = field(default_factory=DeadlineConfig)  # per stream attempt

    def headers_for(self, worker: Worker) -> dict[str, str]:
        token = self.internal_token if worker.kind is KIND_MICROSERVE else worker.spec.api_key
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def engine_client(self, worker: Worker, headers: dict[str, str] | None = None) -> EngineClient:
        return EngineClient(worker.url, self.control, self.internal_token, headers)


class HTTPWorkerHandle(PickedWorker):
    """A picked worker, in flight from the pick until `release` (called when its part of the request ends).

    Strategies call `generate` (the whole request on this worker) or `resume` (continue a broken stream
    here); microserve engines also expose the microserving verbs through `engine` (an `EngineClient`).
    """

    __slots__ = ("_up",)

    def __init__(self, worker: Worker, upstream: Upstream) -> None:
        super().__init__(worker)
        self._up = upstream

    @property
    def engine(self) -> EngineClient:
        return self.engine_with()

    def engine_with(self, headers: dict[str, str] | None = None) -> EngineClient:
        """The engine's client, sending `headers` (a trace context) with every call."""
        if self.worker.kind is not WorkerKind.MICROSERVE:
            raise TypeError(f"{self.url} is not a microserve engine; it has no microserving verbs")
        return self._up.engine_client(self.worker, headers)

    # -- whole requests -----------------------------------------------------------------------------

    async def generate(self, req: RoutedRequest) -> AsyncIterator[bytes]:
        """Run `req` on this worker; yields the client's bytes (one JSON body, or SSE frames)."""
        if not req.stream:
            yield await self.generate_whole(req)
            return
        req.note("generate", self.url)
        track = self._up.track_streams and self.kind is KIND_MICROSERVE
        body = self._generate_body(req, return_token_ids=track and not req.wants_token_ids)
        deadlines = self.deadlines()
        call = call_span(req, "generate", self.worker, microserve__stream=True)
        try:
            resp = await self._post(req.route, body, req, deadlines, trace_headers=call.headers)
            try:
                if track:
                    progress = StreamProgress.for_request(req)
                    async for data in self._frames(resp, progress, progress.track, deadlines):
                        yield data
                    progress.count_into(req)
                else:
                    async for data in self._chunks(resp, None, deadlines, relay=True):
                        yield data
            finally:
                resp.close()  # a no-op once fully read; otherwise the worker sees the client leave
        except BaseException as exc:
            call.fail(exc)
            raise
        finally:
            self.release()
            call.end()

    async def generate_whole(self, req: RoutedRequest) -> bytes:
        """Run a non-streamed `req` on this worker; its JSON body (a coroutine: no generator to drive)."""
        req.note("generate", self.url)
        body = self._generate_body(req)
        call = call_span(req, "generate", self.worker, microserve__stream=False)
        try:
            resp = await self._post(req.route, body, req, trace_headers=call.headers)
            try:
                return await self._read_whole(resp)
            finally:
                resp.close()  # a no-op once fully read; otherwise the worker sees the client leave
        except BaseException as exc:
            call.fail(exc)
            raise
        finally:
            self.release()
            call.end()

    def _generate_body(self, req: RoutedRequest, return_token_ids: bool = False) -> bytes:
        """The client's body as this worker gets it: as sent, unless a field must be added."""
        if self.kind is not KIND_MICROSERVE:
            return req.raw
        overrides: dict[str, Any] = {}
        if return_token_ids:
            overrides["return_token_ids"] = True
        if req.priority is not None:  # other servers may refuse the field (vLLM does)
            overrides["priority"] = req.priority
        return req.upstream_body(**overrides) if overrides else req.raw

    async def resume(self, req: RoutedRequest, progress: StreamProgress) -> AsyncIterator[bytes]:
        """Continue a broken stream here: prompt + generated ids on /v1/completions, as the client's shape."""
        req.note("resume", self.url)
        decoder = self._up.decoder
        decode = await decoder(req.model) if decoder is not None and holds_back(req) else None
        if progress.parts:
            async for data in self._resume_choices(req, progress, decode):
                yield data
            return
        body = progress.resume_body(req, decode)
        if body is None:  # nothing was left to generate, only the stream's end was lost
            self.release()
            for frame in progress.closing_frames():
                yield frame
            return
        async for data in self.completion_stream(req, "/v1/completions", body, progress, verb="resume"):
            yield data

    async def _resume_choices(
        self, req: RoutedRequest, progress: StreamProgress, decode: Callable[[list[int]], str] | None
    ) -> AsyncIterator[bytes]:
        """Continue each unfinished choice of a stream of several, one after the other, as a single-choice
        request of its own; its frames keep the choice's index. Then the usage chunk and [DONE]."""
        try:
            for part in progress.unfinished():
                body = progress.part_for_resume(part).resume_body(req, decode)
                if body is None:
                    for frame in part.closing_frames():
                        yield frame
                    continue
                stream = self.completion_stream(req, "/v1/completions", body, part, verb="resume")
                async for data in stream:
                    yield data
        except BrokenStream as exc:
            exc.progress = progress  # the stream continues from its parts, not from this one
            raise
        finally:
            self.release()
        for frame in progress.ending_frames():
            yield frame

    # -- microserving verbs (microserve engines) --------------------------------------------------

    async def prep_recv(self, req: RoutedRequest, end: int) -> KVAddress:
        """Reserve blocks here for the prompt's KV up to `end`; `.matched` is the prefix already held."""
        call = call_span(req, "prep_recv", self.worker, microserve__end=end)
        try:
            addr: KVAddress = await self._verb(
                self.engine_with(call.headers).prep_recv(req.id, req.prompt_ids, end)
            )
        except BaseException as exc:
            call.fail(exc)
            raise
        finally:
            call.end()
        call.set(microserve__matched_tokens=addr.matched)
        req.note("prep_recv", self.url, addr.matched)
        return addr

    async def remote_send(
        self, req: RoutedRequest, addr: KVAddress, dst: WorkerHandle, begin: int, end: int
    ) -> dict[str, int]:
        """Compute the prompt's KV up to `end` here and push [begin, end) to `dst`; this worker's part of
        the request ends with it."""
        call = call_span(
            req, "remote_send", self.worker, microserve__kv__begin=begin, microserve__kv__end=end,
            microserve__kv__destination=dst.url,
        )  # fmt: skip
        try:
            sent: dict[str, int] = await self._verb(
                self.engine_with(call.headers).remote_send(req.id, req.prompt_ids, addr, dst.url, begin, end)
            )
            call.set(
                microserve__kv__sent_tokens=sent.get("sent_tokens"), microserve__kv__bytes=sent.get("bytes")
            )
            req.note("remote_send", self.url, sent.get("sent_tokens"), sent.get("bytes"))
            return sent
        except BaseException as exc:
            call.fail(exc)
            raise
        finally:
            self.release()
            call.end()

    async def start_generate(self, req: RoutedRequest, begin: int) -> AsyncIterator[bytes]:
        """Generate here on top of the KV received for `req`, answering in the client's shape."""
        req.note("start_generate", self.url)
        body = {**sampling_fields(req), "request_id": req.id, "prompt": req.prompt_ids, "begin": begin}
        path = "/microserving/start_generate"
        if req.stream:
            progress = StreamProgress.for_request(req, req.prompt_ids)
            async for data in self.completion_stream(req, path, body, progress):
                yield data
        else:
            yield await self.completion_whole(req, path, body)

    async def release_kv(self, req: RoutedRequest) -> None:
        """Drop `req`'s reservation here, if any (after a failed transfer); never raises."""
        try:
            await self.engine.release(req.id)
        except (EngineError, *_NETWORK_ERRORS):
            pass

    async def _verb(self, call: Any) -> Any:
        """Await a microserving call; failures become WorkerFailure so the router may retry elsewhere."""
        try:
            return await call
        except EngineError as exc:
            if exc.status >= 500 and exc.status not in _NOT_A_FAILURE:
                self.worker.record_failure(f"http_{exc.status}")
            raise WorkerFailure(self.worker, f"microserving call failed: {exc}") from None
        except _NETWORK_ERRORS as exc:
            self.worker.record_failure("connect")
            raise _unreachable(self.worker, exc) from None

    # -- building blocks for strategies -------------------------------------------------------------

    async def completion_stream(
        self,
        req: RoutedRequest,
        path: str,
        body: dict[str, Any],
        progress: StreamProgress,
        verb: str | None = None,
    ) -> AsyncIterator[bytes]:
        """POST `body` (a streamed completion, e.g. /microserving/start_generate) to `path` here and yield
        it as the client's stream (chat chunks for a chat request), tracked in `progress` so that it can
        continue elsewhere if this worker dies. Releases this worker when it ends. `verb` names the call
        in traces (default: the path's last part)."""
        deadlines = self.deadlines()
        call = call_span(req, verb or path.rsplit("/", 1)[-1], self.worker, microserve__stream=True)
        try:
            resp = await self._post(
                path,
                orjson.dumps({**body, "stream": True, "return_token_ids": True}),
                req,
                deadlines,
                trace_headers=call.headers,
            )
            tools = self._tool_calls(req)
            try:
                async for data in self._frames(resp, progress, progress.reshape, deadlines):
                    yield data if tools is None else tools.feed(data)
                progress.count_into(req)
            finally:
                resp.close()
        except BaseException as exc:
            call.fail(exc)
            raise
        finally:
            self.release()
            call.end()

    async def completion_whole(
        self, req: RoutedRequest, path: str, body: dict[str, Any], verb: str | None = None
    ) -> bytes:
        """POST `body` (a non-streamed completion) to `path` here; the answer in the client's shape."""
        call = call_span(req, verb or path.rsplit("/", 1)[-1], self.worker, microserve__stream=False)
        try:
            whole = {**body, "stream": False, "return_token_ids": req.wants_token_ids}
            resp = await self._post(path, orjson.dumps(whole), req, trace_headers=call.headers)
            try:
                answer = whole_as_client(req, await self._read_whole(resp))
                tools = self._tool_calls(req)
                return answer if tools is None else orjson.dumps(tools.calls.whole(orjson.loads(answer)))
            finally:
                resp.close()
        except BaseException as exc:
            call.fail(exc)
            raise
        finally:
            self.release()
            call.end()

    # -- plumbing -----------------------------------------------------------------------------------

    def _tool_calls(self, req: RoutedRequest) -> SSEToolCalls | None:
        """For a chat answer this router builds: its content read for tool calls, in the syntax the
        engine says its template teaches (`tool_call_parser` in /v1/models)."""
        if req.route is not Route.CHAT:
            return None
        syntax = self.worker.model_cards.get(req.model or "", {}).get("tool_call_parser")
        calls = chat_tool_calls(req.body, syntax)
        return None if calls is None else SSEToolCalls(calls)

    def deadlines(self) -> AttemptDeadlines:
        """This attempt's stream deadlines, from the worker's last load report."""
        return attempt_deadlines(self.worker.load, self._up.deadlines)

    def _stalled(self, what: str, progress: StreamProgress | None) -> BrokenStream:
        # A frozen engine: open its circuit at once, so no new request waits on it.
        self.worker.record_failure("stalled")
        self.worker.breaker.trip()
        return BrokenStream(self.worker, what, progress)

    async def _post(
        self,
        path: str,
        body: bytes,
        req: RoutedRequest,
        deadlines: AttemptDeadlines | None = None,
        trace_headers: dict[str, str] | None = None,
    ) -> Response:
        remaining = req.remaining_s()
        if remaining <= 0:
            raise APIError(504, "The request ran out of time before a worker answered.", code="timeout")
        headers = self._up.headers_for(self.worker)
        if trace_headers is not None:
            headers.update(trace_headers)
        first_byte_s = stall_s = None
        if deadlines is not None:
            # A stream's head must come by its first-byte deadline too: a stopped engine's kernel still
            # accepts the connection and the request, and then nothing comes.
            first_byte_s, stall_s = deadlines.first_byte_s, deadlines.stall_s
        try:
            resp = await self._up.http.request(
                "POST", self.url, path, body=body, headers=headers, timeout_s=remaining,
                connect_timeout_s=self._up.connect_timeout_s, first_byte_s=first_byte_s, stall_s=stall_s,
            )  # fmt: skip
        except ReadStalled:
            assert deadlines is not None
            raise self._stalled(deadlines.missed(first_byte=True), None) from None
        except TimeoutError as exc:
            self.worker.record_failure("connect")
            raise WorkerFailure(self.worker, f"cannot reach the worker: {exc!r}") from None
        except _NETWORK_ERRORS as exc:
            self.worker.record_failure("connect")
            raise _unreachable(self.worker, exc) from None
        if resp.status != 200:
            try:
                data = await resp.read()
            except _NETWORK_ERRORS:
                data = b""
            finally:
                resp.close()
            error = UpstreamHTTPError(self.worker, resp.status, data, resp.headers)
            if resp.status >= 500 and not (resp.status in _NOT_A_FAILURE and error.code != "engine_dead"):
                self.worker.record_failure(f"http_{resp.status}")
            elif resp.status < 500 and resp.status != 429:
                self.worker.record_success()  # it answered, and sensibly: the fault is the request's
            raise error
        return resp

    async def _read_whole(self, resp: Response) -> bytes:
        try:
            data = await resp.read()
        except _NETWORK_ERRORS as exc:
            self.worker.record_failure("broken")
            raise WorkerFailure(self.worker, f"the answer was cut off: {exc!r}") from None
        self.worker.record_success()
        return data

    async def _chunks(
        self,
        resp: Response,
        progress: StreamProgress | None,
        deadlines: AttemptDeadlines | None = None,
        *,
        relay: bool = False,
    ) -> AsyncIterator[bytes]:
        """The response body as it arrives; a cut connection, or a stream that missed the first-byte or
        stall deadline it was requested with (`deadlines`), is a BrokenStream carrying `progress`.
        `relay`: the bytes go to the client as they are (one generator less a chunk than a relay of its
        own), and the stream ends well only with [DONE] in its last 32 bytes."""
        tail = b""  # a relay's last 32 bytes at least (a read that long is kept as it is: no copy)
        while True:
            try:
                data = await resp.read_chunk()  # the connection keeps the read deadlines
            except ReadStalled as exc:
                assert deadlines is not None
                raise self._stalled(deadlines.missed(exc.first_byte), progress) from None
            except _NETWORK_ERRORS as exc:
                self.worker.record_failure("broken")
                raise BrokenStream(self.worker, f"the stream was cut off: {exc!r}", progress) from None
            if not data:
                break
            if relay:
                tail = data if len(data) >= 32 else (tail + data)[-32:]
            yield data
        if relay:
            if b"[DONE]" not in tail[-32:]:
                self.worker.record_failure("broken")
                raise BrokenStream(self.worker, "the stream ended without [DONE]", progress)
            self.worker.record_success()

    async def _frames(
        self,
        resp: Response,
        progress: StreamProgress,
        convert: Callable[[bytes], bytes | None],
        deadlines: AttemptDeadlines | None = None,
    ) -> AsyncIterator[bytes]:
        """Each read's complete SSE frames, converted, as one write; ends well only after [DONE]."""
        buffer = bytearray()
        async for data in self._chunks(resp, progress, deadlines):
            if progress.done:
                continue  # read on to the end of the body, so the connection goes back to the pool
            out: list[bytes] = []
            error: UpstreamStreamError | None = None
            for frame in split_frames(buffer, data):
                try:
                    converted = convert(frame)
                except UpstreamStreamError as exc:
                    error = exc
                    break
                if converted is not None:
                    out.append(converted)
            if out:  # what came before an error event is the client's, and counted as delivered
                yield b"".join(out)
            if error is not None:
                self.worker.record_failure("stream_error")
                raise BrokenStream(self.worker, str(error), progress)
        if not progress.done:
            self.worker.record_failure("broken")
            raise BrokenStream(self.worker, "the stream ended without [DONE]", progress)
        self.worker.record_success()
