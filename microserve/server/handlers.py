"""What the OpenAI routes do below the HTTP handlers: admit, build prompt ids, run the engine, shape.

Every function here is testable without a socket except `serve`, which needs the request to stream to.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing, suppress
from dataclasses import dataclass
from typing import Any, Protocol

from microserve.api.answer import Answer
from microserve.api.errors import APIError, bad_request
from microserve.api.prompt import (
    PromptTokenizer,
    chat_prompt_ids,
    check_prompt_chars,
    max_token_chars,
    text_prompt_ids,
)
from microserve.api.protocol import ChatCompletionRequest, CompletionRequest
from microserve.api.shapes import ChatShape, CompletionShape, ResponseShape, TokenText
from microserve.api.sse import SSE_HEADERS, frame
from microserve.api.tool_calls import ChatToolCalls, forces_call, syntax_for_template
from microserve.engine.errors import EngineDead, EngineOverloaded, PromptTooLong
from microserve.engine.outputs import RequestOutput
from microserve.engine.reservations import ReservationError
from microserve.engine.sampling import InvalidParams, SamplingParams
from microserve.http.server import Request, Response, Stream
from microserve.server import errors
from microserve.server.metrics import RequestTimer, ServerMetrics
from microserve.server.tracing import GenerationSpan, Watch, generation_span
from microserve.tracing import Tracing

log = logging.getLogger(__name__)

# Tokenizing or templating a large prompt takes milliseconds; above this body size it runs in a thread so
# the event loop keeps streaming tokens to everyone else meanwhile.
OFFLOAD_BODY_BYTES = 64 * 1024


class ServingTokenizer(PromptTokenizer, Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class ServingEngine(Protocol):
    """The part of the engine the server uses; the torch engine, the sim engine and test doubles all fit."""

    model_name: str
    max_model_len: int

    @property
    def tokenizer(self) -> ServingTokenizer: ...

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
    """A validated request, ready for the engine: one prompt, or a batch of them (completions)."""

    prompts: list[list[int]]
    params: SamplingParams
    shape: ResponseShape
    stream: bool
    prompt_param: str  # which request field to blame when the prompt is too long
    request_id: str | None = None  # the engine request id; default: the response id
    begin: int | None = None  # start from KV received under `request_id` (microserving)
    echo: list[str] | None = None  # completions' echo: each prompt's text, before its choices'
    max_tokens_param: str = "max_tokens"  # which field asked for max_tokens (for chat, maybe the newer)
    asked_prompt_logprobs: bool = False  # vLLM's prompt_logprobs in the answer (not only echo's)

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts[0]

    def answer(self) -> Answer:
        n = self.params.n
        return Answer(self.shape, n * len(self.prompts), n, self.echo, self.asked_prompt_logprobs)


def logprobs_asked(params: SamplingParams) -> bool:
    return params.logprobs is not None or params.prompt_logprobs is not None


def _token_text(tokenizer: ServingTokenizer) -> TokenText:
    return functools.lru_cache(maxsize=4096)(lambda t: tokenizer.decode([t], skip_special_tokens=False))


def _check_vocab(params: SamplingParams, tokenizer: ServingTokenizer) -> SamplingParams:
    vocab = tokenizer.vocab_size
    if any(t >= vocab for t in params.logit_bias):
        raise bad_request(f"logit_bias token ids must be in [0, {vocab}).", param="logit_bias")
    return params


def prepare_completion(state: ServerState, req: CompletionRequest) -> Prepared:
    model = state.resolve_model(req.model)
    tokenizer = state.engine.tokenizer
    for p in req.prompts:
        if isinstance(p, str):
            check_prompt_chars(p, state.engine.max_model_len, max_token_chars(tokenizer), "prompt")
    prompts = [text_prompt_ids(tokenizer, p) for p in req.prompts]
    longest = max(prompts, key=len)
    max_tokens = req.max_tokens if req.max_tokens is not None else _room(state, longest)
    params = _check_vocab(req.sampling_params(max_tokens), tokenizer)
    asked = params.prompt_logprobs is not None
    echo = None
    if req.echo:
        echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in req.prompts]
        if params.logprobs is not None:
            params.prompt_logprobs = max(params.prompt_logprobs or 0, params.logprobs)
    return Prepared(
        prompts=prompts,
        params=params,
        shape=CompletionShape(
            model=model,
            include_usage=req.include_usage,
            prompt_token_ids=prompts[0] if req.return_token_ids else None,
            token_text=_token_text(tokenizer) if logprobs_asked(params) else None,
            batch_prompt_ids=prompts if req.return_token_ids and len(prompts) > 1 else None,
            n=params.n,
        ),
        stream=req.stream,
        prompt_param="prompt",
        echo=echo,
        asked_prompt_logprobs=asked,
    )


def tool_calls_for(req: ChatCompletionRequest, template: str | None) -> ChatToolCalls | None:
    """How the answer is read for tool calls (None: it is not), in the syntax the template teaches."""
    if not req.calls_tools:
        return None
    syntax = "json" if forces_call(req.tool_choice) else syntax_for_template(template)
    return ChatToolCalls(syntax, parallel=req.parallel_tool_calls is not False)


def prepare_chat(state: ServerState, req: ChatCompletionRequest) -> Prepared:
    model = state.resolve_model(req.model)
    tokenizer = state.engine.tokenizer
    limit = max_token_chars(tokenizer)
    prompt_ids = chat_prompt_ids(
        tokenizer,
        req.template_messages(),
        lambda text: check_prompt_chars(text, state.engine.max_model_len, limit, "messages"),
        req.template_tools(),
    )
    requested = req.requested_max_tokens
    max_tokens = requested if requested is not None else _room(state, prompt_ids)
    params = _check_vocab(req.sampling_params(max_tokens), tokenizer)
    return Prepared(
        prompts=[prompt_ids],
        params=params,
        shape=ChatShape(
            model=model,
            include_usage=req.include_usage,
            prompt_token_ids=prompt_ids if req.return_token_ids else None,
            token_text=_token_text(tokenizer) if logprobs_asked(params) else None,
            tool_calls=tool_calls_for(req, getattr(tokenizer, "chat_template", None)),
        ),
        stream=req.stream,
        prompt_param="messages",
        asked_prompt_logprobs=params.prompt_logprobs is not None,
        max_tokens_param=req.max_tokens_param,
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


Tagged = tuple[int, RequestOutput]  # (which prompt, one of its outputs)


async def _first_outputs(
    gens: list[AsyncGenerator[RequestOutput, None]], prepared: Prepared
) -> list[RequestOutput]:
    """Every prompt's first output, awaited before any byte is sent, so that overload and too-long
    prompts are proper HTTP errors (and the router may still retry elsewhere)."""
    try:
        return list(await asyncio.gather(*(_next_output(g) for g in gens)))
    except EngineOverloaded as exc:
        raise errors.overloaded(str(exc) or "The engine is overloaded; retry later.") from None
    except ReservationError as exc:
        raise APIError(404, str(exc), param="request_id", code="reservation_not_found") from None
    except PromptTooLong as exc:
        # Too long by itself, or only with what max_tokens asks on top: blame the field that is.
        param = prepared.prompt_param if exc.by_itself else prepared.max_tokens_param
        raise bad_request(str(exc), param=param, code="context_length_exceeded") from None
    except InvalidParams as exc:
        raise bad_request(str(exc), param=exc.param) from None
    except ValueError as exc:  # the engine's own validation of prompt ids and params
        raise bad_request(str(exc)) from None
    except EngineDead as exc:
        raise errors.engine_dead(str(exc) or "The engine stopped.") from None


async def _merged(
    gens: list[AsyncGenerator[RequestOutput, None]], firsts: list[RequestOutput]
) -> AsyncGenerator[Tagged, None]:
    """The outputs of several prompts' generations as they come, each tagged with its prompt."""
    for i, first in enumerate(firsts):
        yield i, first
    if len(gens) == 1:  # the common case: no tasks, no queue
        async for out in gens[0]:
            yield 0, out
        return
    queue: asyncio.Queue[Tagged | BaseException | None] = asyncio.Queue()

    async def pump(i: int, gen: AsyncGenerator[RequestOutput, None]) -> None:
        try:
            async for out in gen:
                queue.put_nowait((i, out))
        except BaseException as exc:  # handed to the reader, who raises it
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


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
    gens = [
        state.engine.generate(
            request_id if i == 0 else f"{request_id}-{i}",
            ids,
            prepared.params,
            prepared.begin if i == 0 else None,
        )
        for i, ids in enumerate(prepared.prompts)
    ]
    if watch is not None:
        gens = [watch(g) for g in gens]
    # AsyncExitStack of aclosing: whatever way this returns — done, client gone, handler cancelled —
    # the engine aborts the requests and frees their KV blocks at once.
    async with contextlib.AsyncExitStack() as stack:
        for gen in gens:
            await stack.enter_async_context(aclosing(gen))
        firsts = await _first_outputs(gens, prepared)
        outputs = _merged(gens, firsts)
        answer = prepared.answer()
        try:
            if prepared.stream:
                return await stream_sse(request, outputs, answer, timer)
            await collect(request, outputs, answer, timer)
        except asyncio.CancelledError:
            timer.finish("abort")
            raise
        except EngineDead as exc:
            raise errors.engine_dead(str(exc) or "The engine stopped.") from None
        finally:
            await outputs.aclose()
    return Response.json(answer.whole())


class ClientDisconnected(ConnectionResetError):
    """The client closed the connection before the answer was complete."""


async def _next_output(gen: AsyncGenerator[RequestOutput, None]) -> RequestOutput:
    output = await anext(gen, None)
    if output is None:
        raise RuntimeError("the engine ended a request without a finished output")
    return output


async def collect(
    request: Request, outputs: AsyncGenerator[Tagged, None], answer: Answer, timer: RequestTimer
) -> None:
    """Gather a whole answer: every choice's text, token ids, logprobs, finish reason, and the usage."""
    async for prompt, output in outputs:
        timer.observe(output)
        answer.add(prompt, output)
        if answer.done:
            timer.finish(answer.finish_reason)
            return
        # The server cancels this handler when its client goes; polling as well costs nothing and
        # holds for a caller that does not cancel.
        if request.disconnected():
            timer.finish("abort")
            raise ClientDisconnected("client disconnected before the completion was ready")
    raise RuntimeError("the engine ended a request without a finished output")


async def stream_sse(
    request: Request, outputs: AsyncGenerator[Tagged, None], answer: Answer, timer: RequestTimer
) -> Stream:
    """Stream an answer as server-sent events: deltas, a finish chunk per choice, usage if asked, [DONE]."""
    response = await request.stream(200, SSE_HEADERS)
    frames = answer.opening()
    try:
        async for prompt, output in outputs:
            timer.observe(output)
            frames.extend(answer.frames(prompt, output))
            if answer.done:
                frames.extend(answer.closing())
                await response.write(b"".join(frames))
                timer.finish(answer.finish_reason)
                return response
            if frames:
                # One write per engine output: each is one syscall instead of one per frame.
                await response.write(b"".join(frames))
                frames = []
        raise RuntimeError("the engine ended a request without a finished output")
    except ConnectionResetError:
        timer.finish("abort")
        return response
    except Exception as exc:
        # Headers are gone already: the error travels as an SSE event, and no [DONE] marks the stream cut.
        err = errors.engine_dead(str(exc)) if isinstance(exc, EngineDead) else errors.internal_error()
        if not isinstance(exc, EngineDead):
            log.exception("request %s failed mid-stream", answer.shape.id)
        with suppress(ConnectionResetError):
            await response.write(frame(err.body()))
        return response
