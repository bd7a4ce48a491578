"""What the OpenAI routes do below the HTTP handlers: admit, build prompt ids, run the engine, shape.

Every function here is testable without a socket except `serve`, which needs the request to stream to.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing, suppress
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from microserve.engine.errors import EngineDead, EngineOverloaded, PromptTooLong
from microserve.engine.outputs import FinishReason, RequestOutput
from microserve.engine.reservations import ReservationError
from microserve.engine.sampling import SamplingParams
from microserve.http.server import Request, Response, Stream
from microserve.server import errors
from microserve.server.errors import APIError, bad_request
from microserve.server.metrics import RequestTimer, ServerMetrics
from microserve.server.prompt_limits import check_prompt_chars, max_token_chars
from microserve.server.protocol import (
    ChatCompletionRequest,
    ChatShape,
    CompletionRequest,
    CompletionShape,
    ResponseShape,
)
from microserve.server.tracing import GenerationSpan, Watch, generation_span
from microserve.tracing import Tracing

log = logging.getLogger(__name__)

# Tokenizing or templating a large prompt takes milliseconds; above this body size it runs in a thread so
# the event loop keeps streaming tokens to everyone else meanwhile.
OFFLOAD_BODY_BYTES = 64 * 1024

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"


class ServingTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str: ...


class ServingEngine(Protocol):
    """The part of the engine the server uses; the torch engine, the sim engine and test doubles all fit."""

    model_name: str
    tokenizer: ServingTokenizer
    max_model_len: int

    def is_ready(self) -> bool: ...

    def load(self) -> dict[str, Any]: ...

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, begin: int | None = None
    ) -> AsyncGenerator[RequestOutput, None]: ...


@dataclass(slots=True)
class ServerState:
    """Everything the handlers share, owned by one app (no module-level state)."""

    engine: ServingEngine
    served_model_names: list[str]
    metrics: ServerMetrics
    max_waiting: int | None = None
    draining: bool = False
    tracing: Tracing | None = None  # None: no OTEL_* endpoint set, no spans

    def resolve_model(self, requested: str | None) -> str:
        """The served name to answer with; a missing `model` means the default (first) one, as in vLLM."""
        if requested is None:
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise errors.model_not_found(requested)
        return requested

    def admit(self) -> None:
        """Refuse work up front when it cannot start soon, so clients and the router can go elsewhere."""
        if self.draining:
            raise errors.not_ready("The server is shutting down; send the request elsewhere.")
        if not self.engine.is_ready():
            raise errors.not_ready()
        if self.max_waiting is not None and self.engine.load()["waiting"] >= self.max_waiting:
            raise errors.overloaded(
                f"The engine has {self.max_waiting} or more requests waiting; retry later."
            )


@dataclass(slots=True)
class Prepared:
    """A validated request, ready for the engine."""

    prompt_ids: list[int]
    params: SamplingParams
    shape: ResponseShape
    stream: bool
    prompt_param: str  # which request field to blame when the prompt is too long
    request_id: str | None = None  # the engine request id; default: the response id
    begin: int | None = None  # start from KV received under `request_id` (microserving)


def prepare_completion(state: ServerState, req: CompletionRequest) -> Prepared:
    model = state.resolve_model(req.model)
    tokenizer = state.engine.tokenizer
    if isinstance(req.prompt, str):
        check_prompt_chars(req.prompt, state.engine.max_model_len, max_token_chars(tokenizer), "prompt")
        prompt_ids = tokenizer.encode(req.prompt, add_special_tokens=True)
    else:
        prompt_ids = _checked_token_ids(req.prompt, tokenizer.vocab_size)
    max_tokens = req.max_tokens if req.max_tokens is not None else _room(state, prompt_ids)
    return Prepared(
        prompt_ids=prompt_ids,
        params=req.sampling_params(max_tokens),
        shape=CompletionShape(
            model=model,
            include_usage=req.include_usage,
            prompt_token_ids=prompt_ids if req.return_token_ids else None,
        ),
        stream=req.stream,
        prompt_param="prompt",
    )


def prepare_chat(state: ServerState, req: ChatCompletionRequest) -> Prepared:
    model = state.resolve_model(req.model)
    tokenizer = state.engine.tokenizer
    try:
        text = tokenizer.apply_chat_template(req.template_messages(), add_generation_prompt=True)
    except ValueError as exc:  # ChatTemplateError: the template rejected the conversation
        raise bad_request(
            f"The chat template cannot render these messages: {exc}", param="messages"
        ) from None
    check_prompt_chars(text, state.engine.max_model_len, max_token_chars(tokenizer), "messages")
    # The rendered template already carries BOS and role markers; adding them again would double them.
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    requested = req.requested_max_tokens
    max_tokens = requested if requested is not None else _room(state, prompt_ids)
    return Prepared(
        prompt_ids=prompt_ids,
        params=req.sampling_params(max_tokens),
        shape=ChatShape(
            model=model,
            include_usage=req.include_usage,
            prompt_token_ids=prompt_ids if req.return_token_ids else None,
        ),
        stream=req.stream,
        prompt_param="messages",
    )


async def prepare(
    state: ServerState, req: CompletionRequest | ChatCompletionRequest, body_size: int
) -> Prepared:
    """Build the request's prompt ids and parameters, off the event loop when the body is large."""
    if isinstance(req, ChatCompletionRequest):
        build = functools.partial(prepare_chat, state, req)
    else:
        build = functools.partial(prepare_completion, state, req)
    return await asyncio.to_thread(build) if body_size > OFFLOAD_BODY_BYTES else build()


def _room(state: ServerState, prompt_ids: list[int]) -> int:
    # With no max_tokens the answer may fill the context; at least 1 so that an over-long prompt is
    # reported as such by the engine rather than as a max_tokens error.
    return max(1, state.engine.max_model_len - len(prompt_ids))


def _checked_token_ids(ids: list[int], vocab_size: int) -> list[int]:
    for i, tok in enumerate(ids):
        if not 0 <= tok < vocab_size:
            raise bad_request(
                f"prompt token id {tok} at position {i} is outside the vocabulary [0, {vocab_size}).",
                param="prompt",
            )
    return ids


async def serve(request: Request, state: ServerState, prepared: Prepared) -> Response | Stream:
    """Run one request on the engine and answer it as JSON or as SSE; the engine request ends with it."""
    if state.tracing is None:
        return await _serve(request, state, prepared)
    span: GenerationSpan = generation_span(state.tracing, request.headers, prepared)
    try:
        response = await _serve(request, state, prepared, span.watch if span.recording else None)
    except BaseException as exc:
        span.end(exc)
        raise
    span.end()
    return response


async def _serve(
    request: Request, state: ServerState, prepared: Prepared, watch: Watch | None = None
) -> Response | Stream:
    state.admit()
    request_id = prepared.request_id or prepared.shape.id
    timer = state.metrics.start_request()
    gen = state.engine.generate(request_id, prepared.prompt_ids, prepared.params, prepared.begin)
    if watch is not None:
        gen = watch(gen)
    # aclosing: whatever way this returns — done, client gone, handler cancelled — the engine aborts
    # the request and frees its KV blocks at once.
    async with aclosing(gen):
        try:
            # The first output is awaited before any byte is sent, so that overload and too-long prompts are
            # proper HTTP errors (and the router may still retry elsewhere).
            first = await _next_output(gen)
        except EngineOverloaded as exc:
            raise errors.overloaded(str(exc) or "The engine is overloaded; retry later.") from None
        except ReservationError as exc:
            raise APIError(404, str(exc), param="request_id", code="reservation_not_found") from None
        except PromptTooLong as exc:
            raise bad_request(str(exc), param=prepared.prompt_param, code="context_length_exceeded") from None
        except ValueError as exc:  # the engine's own validation of prompt ids and params
            raise bad_request(str(exc)) from None
        except EngineDead as exc:
            raise errors.engine_dead(str(exc) or "The engine stopped.") from None
        try:
            if prepared.stream:
                return await stream_sse(request, gen, first, prepared.shape, timer)
            text, last, token_ids = await collect(request, gen, first, timer)
        except asyncio.CancelledError:
            timer.finish("abort")
            raise
        except EngineDead as exc:
            raise errors.engine_dead(str(exc) or "The engine stopped.") from None
    return Response.json(prepared.shape.full(text, last, token_ids))


class ClientDisconnected(ConnectionResetError):
    """The client closed the connection before the answer was complete."""


async def _next_output(gen: AsyncGenerator[RequestOutput, None]) -> RequestOutput:
    output = await anext(gen, None)
    if output is None:
        raise RuntimeError("the engine ended a request without a finished output")
    return output


async def collect(
    request: Request,
    gen: AsyncGenerator[RequestOutput, None],
    first: RequestOutput,
    timer: RequestTimer,
) -> tuple[str, RequestOutput, list[int]]:
    """Gather a whole answer: its text, its last output (finish reason, usage) and its token ids."""
    parts: list[str] = []
    token_ids: list[int] = []
    output = first
    while True:
        timer.observe(output)
        parts.append(output.text)
        token_ids.extend(output.token_ids)
        if output.finished:
            timer.finish(str(output.finish_reason or FinishReason.STOP))
            return "".join(parts), output, token_ids
        # The server cancels this handler when its client goes; polling as well costs nothing and
        # holds for a caller that does not cancel.
        if request.disconnected():
            timer.finish("abort")
            raise ClientDisconnected("client disconnected before the completion was ready")
        output = await _next_output(gen)


def _frame(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def stream_sse(
    request: Request,
    gen: AsyncGenerator[RequestOutput, None],
    first: RequestOutput,
    shape: ResponseShape,
    timer: RequestTimer,
) -> Stream:
    """Stream an answer as server-sent events: deltas, a finish chunk, usage if asked, then [DONE]."""
    response = await request.stream(200, SSE_HEADERS)
    frames = [_frame(chunk) for chunk in shape.opening_chunks()]
    output = first
    try:
        while True:
            timer.observe(output)
            # With return_token_ids a token whose text is still held back (half a UTF-8 character, a
            # possible stop string) gets its own chunk too, so that every generated id is reported.
            if output.text or (shape.return_token_ids and output.token_ids):
                frames.append(_frame(shape.delta_chunk(output.text, output.token_ids)))
            if output.finished:
                frames.append(_frame(shape.finish_chunk(output.finish_reason)))
                if shape.include_usage:
                    frames.append(_frame(shape.usage_chunk(output)))
                frames.append(SSE_DONE)
                await response.write(b"".join(frames))
                timer.finish(str(output.finish_reason or FinishReason.STOP))
                return response
            if frames:
                # One write per engine output: each is one syscall instead of one per frame.
                await response.write(b"".join(frames))
                frames = []
            output = await _next_output(gen)
    except ConnectionResetError:
        timer.finish("abort")
        return response
    except Exception as exc:
        # Headers are gone already: the error travels as an SSE event, and no [DONE] marks the stream cut.
        err = errors.engine_dead(str(exc)) if isinstance(exc, EngineDead) else errors.internal_error()
        if not isinstance(exc, EngineDead):
            log.exception("request %s failed mid-stream", shape.id)
        with suppress(ConnectionResetError):
            await response.write(_frame(err.body()))
        return response
