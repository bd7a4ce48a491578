"""OpenAI request models (pydantic) and response shapes (plain dicts, serialized with orjson).

Requests are validated once at the edge; what the engine cannot do (n > 1, echo, logprobs) is a clear 400.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, NonNegativeInt, ValidationError, field_validator

from microserve.engine.outputs import FinishReason, RequestOutput
from microserve.engine.sampling import InvalidParams, SamplingParams
from microserve.server.errors import APIError, bad_request

# --------------------------------------------------------------------------------------------- requests


class RequestModel(BaseModel):
    # Unknown fields are ignored, as vLLM does, so clients that send extra vendor fields keep working.
    model_config = ConfigDict(extra="ignore")

    def check_supported(self) -> None:
        """Refuse values that parse but that this server does not support (a 400 naming the field)."""


class StreamOptions(RequestModel):
    include_usage: bool = False


class _GenerationRequest(RequestModel):
    """Fields shared by both endpoints: model, sampling, streaming and the unsupported-but-accepted ones."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[NonNegativeInt] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # vLLM's extension: answer with the prompt's token ids and each choice's new token ids. The router
    # uses it to continue a stream on another engine when one dies mid-stream.
    return_token_ids: bool = False
    # vLLM's extension: the scheduler admits lower values first (the router sends its priority class).
    priority: int = 0

    def check_supported(self) -> None:
        """Reject what the engine cannot honour, instead of silently ignoring it."""
        if self.n not in (None, 1):
            raise bad_request(f"Only n=1 is supported, got n={self.n}.", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise bad_request(f"{name} is not supported; send 0 or omit it.", param=name)
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k is None else self.top_k,
                seed=self.seed,
                stop=stop,
                stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
                priority=self.priority,
            )
        except InvalidParams as exc:
            raise bad_request(str(exc)) from None


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. `prompt` is normalized to one text or one list of token ids."""

    prompt: str | list[int]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        wrong = "prompt must be a string, a list of token ids, or a list holding one of those"
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(wrong)
        if all(_is_token_id(v) for v in value):
            return value  # an empty list is reported as an empty prompt, not as a wrong type
        if len(value) > 1 and all(isinstance(v, (str, list)) for v in value):
            raise ValueError(
                f"batched prompts are not supported: got {len(value)} prompts, send one prompt per request"
            )
        only = value[0] if len(value) == 1 else None
        if isinstance(only, str) or (isinstance(only, list) and all(_is_token_id(v) for v in only)):
            return only
        raise ValueError(wrong)

    def check_supported(self) -> None:
        super().check_supported()
        if not self.prompt:
            raise bad_request("prompt must not be empty.", param="prompt")
        if self.echo:
            raise bad_request("echo is not supported.", param="echo")
        if self.logprobs is not None:
            raise bad_request("logprobs is not supported.", param="logprobs")
        if self.best_of not in (None, 1):
            raise bad_request(f"Only best_of=1 is supported, got best_of={self.best_of}.", param="best_of")


class ChatMessage(BaseModel):
    """One message; `content` text parts are joined, other fields (name, tool_calls…) reach the template."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> str | None:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of text parts")
        texts = []
        for part in value:
            if isinstance(part, dict) and part.get("type", "text") != "text":
                raise ValueError(f"content part type {part['type']!r} is not supported; only 'text' is")
            if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                raise ValueError('each content part must be an object {"type": "text", "text": "..."}')
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise bad_request("messages must contain at least one message.", param="messages")
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs is not supported.", param="logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens replaced max_tokens in OpenAI's API; the newer one wins when both are sent.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]


RequestT = TypeVar("RequestT", bound=_GenerationRequest)


def parse_request(cls: type[RequestT], body: Any) -> RequestT:
    """Validate a decoded JSON body into `cls`, turning every failure into a 400 that names the field."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        request = cls.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    request.check_supported()
    return request


def _validation_error(exc: ValidationError) -> APIError:
    messages = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        # A validator's own ValueError reads better without pydantic's "Value error, " prefix.
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        messages.append(f"{loc}: {msg}" if loc else msg)
    first_loc = exc.errors()[0]["loc"] if exc.errors() else ()
    param = ".".join(str(p) for p in first_loc) or None
    return bad_request("Invalid request: " + "; ".join(messages), param=param)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -------------------------------------------------------------------------------------------- responses


def usage(output: RequestOutput) -> dict[str, Any]:
    return {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "total_tokens": output.prompt_tokens + output.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": output.cached_tokens},
    }


def _reason(reason: FinishReason | None) -> str | None:
    return None if reason is None else str(reason)


@dataclass(slots=True)
class CompletionShape:
    """The JSON shapes of one /v1/completions response, whole or as `text_completion` chunks.

    With `prompt_token_ids` set (the request asked for `return_token_ids`), the choice carries vLLM's
    `prompt_token_ids` (whole answer, or first chunk only) and `token_ids` (the ids new in that chunk).
    """

    model: str
    include_usage: bool = False
    prompt_token_ids: list[int] | None = None
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    _prompt_ids_sent: bool = False

    @property
    def return_token_ids(self) -> bool:
        return self.prompt_token_ids is not None

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = self._envelope(choices)
        if self.include_usage:
            # OpenAI puts `usage: null` on every chunk but the last when include_usage is on.
            body["usage"] = None
        return body

    def _choice(self, text: str, reason: FinishReason | None, token_ids: list[int]) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": _reason(reason),
        }
        if self.prompt_token_ids is not None:
            if not self._prompt_ids_sent:
                choice["prompt_token_ids"] = self.prompt_token_ids
                self._prompt_ids_sent = True
            choice["token_ids"] = token_ids
        return choice

    def full(self, text: str, last: RequestOutput, token_ids: list[int] | None = None) -> dict[str, Any]:
        body = self._envelope([self._choice(text, last.finish_reason, token_ids or [])])
        body["usage"] = usage(last)
        return body

    def opening_chunks(self) -> list[dict[str, Any]]:
        return []

    def delta_chunk(self, text: str, token_ids: list[int] | None = None) -> dict[str, Any]:
        return self._chunk([self._choice(text, None, token_ids or [])])

    def finish_chunk(self, reason: FinishReason | None) -> dict[str, Any]:
        return self._chunk([self._choice("", reason, [])])

    def usage_chunk(self, last: RequestOutput) -> dict[str, Any]:
        body = self._envelope([])
        body["usage"] = usage(last)
        return body


@dataclass(slots=True)
class ChatShape:
    """The JSON shapes of one /v1/chat/completions response, whole or as `chat.completion.chunk`s.

    With `prompt_token_ids` set (`return_token_ids`), the body carries vLLM's top-level `prompt_token_ids`
    (whole answer, or the opening chunk) and each choice the `token_ids` new in it.
    """

    model: str
    include_usage: bool = False
    prompt_token_ids: list[int] | None = None
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def return_token_ids(self) -> bool:
        return self.prompt_token_ids is not None

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _chunk(
        self, delta: dict[str, Any], reason: FinishReason | None, token_ids: list[int]
    ) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": _reason(reason)}
        if self.prompt_token_ids is not None:
            choice["token_ids"] = token_ids
        body = self._envelope("chat.completion.chunk", [choice])
        if self.include_usage:
            body["usage"] = None
        return body

    def full(self, text: str, last: RequestOutput, token_ids: list[int] | None = None) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": _reason(last.finish_reason),
        }
        if self.prompt_token_ids is not None:
            choice["token_ids"] = token_ids or []
        body = self._envelope("chat.completion", [choice])
        if self.prompt_token_ids is not None:
            body["prompt_token_ids"] = self.prompt_token_ids
        body["usage"] = usage(last)
        return body

    def opening_chunks(self) -> list[dict[str, Any]]:
        chunk = self._chunk({"role": "assistant", "content": ""}, None, [])
        if self.prompt_token_ids is not None:
            chunk["prompt_token_ids"] = self.prompt_token_ids
        return [chunk]

    def delta_chunk(self, text: str, token_ids: list[int] | None = None) -> dict[str, Any]:
        return self._chunk({"content": text}, None, token_ids or [])

    def finish_chunk(self, reason: FinishReason | None) -> dict[str, Any]:
        return self._chunk({}, reason, [])

    def usage_chunk(self, last: RequestOutput) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk", [])
        body["usage"] = usage(last)
        return body


ResponseShape = CompletionShape | ChatShape
