"""OpenAI request models: the one validation the engine and the router both run.

Strict types (a string is not a number, `true` is not 1), null wherever OpenAI allows it, and no silent
drop: a field this server does not know is a 400 naming it, except the habit fields in `ACCEPTED_UNUSED`
(sent by clients whatever the server), which are accepted and logged once at debug level.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, NonNegativeInt, ValidationError, field_validator, model_validator

from microserve.api.errors import APIError, bad_request
from microserve.api.structured import (
    GUIDED_FIELDS,
    STRUCTURED_FIELDS,
    ResponseFormat,
    StructuredOutputs,
    grammar_spec,
)
from microserve.api.tool_calls import forces_call, tool_choice_schema
from microserve.engine.grammar import GrammarSpec
from microserve.engine.sampling import MAX_LOGPROBS, InvalidParams, SamplingParams

log = logging.getLogger(__name__)

# Fields clients send by habit that change nothing here: accepted, logged once at debug level.
ACCEPTED_UNUSED = frozenset(
    {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "stream_options"}
)
_logged_unused: set[str] = set()  # per process: "logged once" is about the log, not about state


class RequestModel(BaseModel):
    """Strict, and null accepted for every field that has a default (OpenAI's spec allows it): it means
    None where the field takes None (completions' `max_tokens: null`: the rest of the context), else the
    default (`stream: null` is false). An unknown field sent as null is as good as absent."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict) or None not in data.values():
            return data  # the common case, on the router's hot path
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if v is not None
            or (k in fields and (fields[k].is_required() or type(None) in get_args(fields[k].annotation)))
        }

    def check_supported(self) -> None:
        """Refuse fields this server does not know (a 400 naming the first), log the habit ones."""
        for name in self.model_extra or {}:
            if name not in ACCEPTED_UNUSED:
                raise bad_request(f"Unrecognized request argument supplied: {name}", param=name)
            if name not in _logged_unused:
                _logged_unused.add(name)
                log.debug("request field %r is accepted and not used", name)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = False


class _GenerationRequest(RequestModel):
    """Fields shared by both endpoints: model, sampling, streaming, logprobs and vLLM's extensions."""

    # The fields `check_supported` judges beyond their types (api/plain_check.py never passes them).
    judged_fields: ClassVar[frozenset[str]] = frozenset({"n", "stream_options", *STRUCTURED_FIELDS})

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[NonNegativeInt] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    # vLLM's extension: answer with the prompt's token ids and each choice's new token ids. The router
    # uses it to continue a stream on another engine when one dies mid-stream.
    return_token_ids: bool = False
    # microserve's, set by the router on a continued stream: the prompt's last tokens that an earlier
    # engine generated, which the penalties count as output.
    prior_output_tokens: NonNegativeInt = 0
    # microserve's, set by the router when it continues one choice of an n > 1 stream: the choice this
    # single-choice request stands for (it samples as that choice: sim words, seed + index).
    choice_index: NonNegativeInt = 0
    # vLLM's extension: the scheduler admits lower values first (the router sends its priority class).
    priority: int = 0
    # Structured output (microserve/api/structured.py): OpenAI's, vLLM's, and vLLM's legacy fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
        if not 1 <= self.n <= 128:
            raise bad_request(f"n must be between 1 and 128, got {self.n}.", param="n")
        try:  # the fields' shapes (cheap); the grammar itself is compiled by the engine
            self.grammar_spec()
        except InvalidParams as exc:
            raise bad_request(str(exc), param=exc.param) from None

    def grammar_spec(self) -> GrammarSpec | None:
        """The grammar the answer must match (structured output), or None."""
        fields = self.__dict__  # the common case, none of them sent, on the router's hot path
        if all(fields[name] is None for name in STRUCTURED_FIELDS):
            return None
        guided = {name: fields[name] for name in GUIDED_FIELDS}
        return grammar_spec(self.response_format, self.structured_outputs, guided)

    def check_ranges(self) -> None:
        """Build the sampling parameters once to check their ranges (a 400 naming the field): the router
        runs this same check, so a request it forwards never fails later for what it could have seen."""
        requested = self.requested_max_tokens
        self.sampling_params(max_tokens=requested if requested is not None else max(1, self.min_tokens))

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    @property
    def requested_max_tokens(self) -> int | None:
        return getattr(self, "max_tokens", None)

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    @property
    def sample_logprobs(self) -> int | None:
        """How many top logprobs each sampled token carries; None: no logprobs."""
        return None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k is None else self.top_k,
                min_p=self.min_p or 0.0,
                seed=self.seed,
                stop=stop,
                stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
                n=self.n,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                logit_bias=_token_bias(self.logit_bias),
                logprobs=self.sample_logprobs,
                prompt_logprobs=self.prompt_logprobs,
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens,
                num_prior_output_tokens=self.prior_output_tokens,
                choice_index=self.choice_index,
                priority=self.priority,
                grammar=self.grammar_spec(),
            )
        except InvalidParams as exc:
            if exc.param == "max_tokens":
                raise bad_request(
                    str(exc).replace("max_tokens", self.max_tokens_param, 1), param=self.max_tokens_param
                ) from None
            raise bad_request(str(exc), param=exc.param) from None


def _token_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise InvalidParams(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
    return out


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. `prompt` is one text or token-id list, or a batch of them (`prompts`)."""

    judged_fields = _GenerationRequest.judged_fields | {"prompt", "logprobs", "best_of"}

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        if not isinstance(value, str | list):
            raise ValueError("prompt must be a string, a list of token ids, or a list of those")
        if isinstance(value, list) and value and all(_is_token_id(v) for v in value):
            return value
        if isinstance(value, list) and value and not all(isinstance(v, str | list) for v in value):
            raise ValueError("prompt must be a string, a list of token ids, or a list of those")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or all(_is_token_id(v) for v in self.prompt):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]

    @property
    def sample_logprobs(self) -> int | None:
        return self.logprobs

    def check_supported(self) -> None:
        super().check_supported()
        if not self.prompt or any(not p for p in self.prompts):
            raise bad_request("prompt must not be empty.", param="prompt")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad_request(f"logprobs must be between 0 and {MAX_LOGPROBS}.", param="logprobs")
        if self.best_of not in (None, self.n):
            raise bad_request(f"best_of must equal n ({self.n}), got {self.best_of}.", param="best_of")


class ChatMessage(BaseModel):
    """One message; `content` text parts are joined, other fields (name, tool_calls…) reach the template.

    Null content (an assistant turn that only calls tools) is rendered as "", as vLLM does. No Python
    validator runs per message (the router validates every request): parts are joined by `check`."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[Any] | None = None

    def check(self, where: str) -> None:
        """Join text parts into one string (a 400 naming `where` for any other part)."""
        if not isinstance(self.content, list):
            return
        texts = []
        for part in self.content:
            if isinstance(part, dict) and part.get("type", "text") != "text":
                message = f"content part type {part['type']!r} is not supported; only 'text' is"
                raise bad_request(f"Invalid request: {where}: {message}", param=where)
            if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                message = 'each content part must be an object {"type": "text", "text": "..."}'
                raise bad_request(f"Invalid request: {where}: {message}", param=where)
            texts.append(part["text"])
        self.content = "\n".join(texts)

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if self.content is None and "content" in self.model_fields_set:
            message["content"] = ""  # sent as null: "" (left out, the template says what is missing)
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [template_tool_call(c) for c in message["tool_calls"]]
        return message


def template_tool_call(call: Any) -> Any:
    """An OpenAI tool call as chat templates expect it (as vLLM hands it): `arguments` an object, not
    the JSON text OpenAI sends, so `arguments | tojson` renders the object."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(BaseModel):
    """One entry of `tools`: OpenAI's function tool."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: FunctionSpec


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`: call exactly that function."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    judged_fields = _GenerationRequest.judged_fields | {
        "messages", "tools", "tool_choice", "logprobs", "top_logprobs"
    }  # fmt: skip

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise bad_request("messages must contain at least one message.", param="messages")
        self._check_tools()
        for i, message in enumerate(self.messages):
            message.check(f"messages.{i}.content")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad_request("top_logprobs needs logprobs set to true.", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(f"top_logprobs must be between 0 and {MAX_LOGPROBS}.", param="top_logprobs")

    @property
    def sample_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens replaced max_tokens in OpenAI's API; the newer one wins when both are sent.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def grammar_spec(self) -> GrammarSpec | None:
        """A forced tool_choice decodes under the schema of its calls (api/tool_calls.py), so the
        arguments always parse and match the function's parameters; else the structured output's."""
        other = super().grammar_spec()
        if not forces_call(self.tool_choice) or not self.tools:
            return other  # no forced call: the tools are not dumped (the router's hot path)
        schema = tool_choice_schema(
            self.template_tools() or [], self._plain_tool_choice(), self.parallel_tool_calls is not False
        )
        if schema is None:
            return other
        if other is not None:
            raise InvalidParams(
                f"tool_choice forcing a call cannot be combined with {other.param}", "tool_choice"
            )
        return GrammarSpec.json_schema(schema, "tool_choice")

    def _plain_tool_choice(self) -> Any:
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

    def template_tools(self) -> list[dict[str, Any]] | None:
        """`tools` as the chat template sees them (None when there are none)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    @property
    def calls_tools(self) -> bool:
        """Whether the answer is parsed for tool calls: tools given and tool_choice is not "none"."""
        return bool(self.tools) and self.tool_choice != "none"

    def _check_tools(self) -> None:
        choice = self.tool_choice
        if choice is None or choice == "none" or choice == "auto":
            return  # nothing to check against the tools (the router's hot path)
        names = [t.function.name for t in self.tools or []]
        if choice == "required" and not names:
            raise bad_request('tool_choice "required" needs at least one tool in tools.', param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise bad_request(
                f"tool_choice names function {choice.function.name!r}, which is not in tools.",
                param="tool_choice",
            )


RequestT = TypeVar("RequestT", bound=RequestModel)


def parse_request(cls: type[RequestT], body: Any, *, ranges: bool = True) -> RequestT:
    """Validate a decoded JSON body into `cls`, turning every failure into a 400 that names the field.

    `ranges=False` (the router) leaves the sampling ranges to the engine, which answers the same 400
    (relayed unchanged): building the parameters costs more than the rest of the check."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:  # the model's validator itself: `model_validate` only adds a Python call around it
        request: RequestT = cls.__pydantic_validator__.validate_python(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    request.check_supported()
    if ranges and isinstance(request, _GenerationRequest):
        request.check_ranges()
    return request


def validation_error(exc: ValidationError) -> APIError:
    messages = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        # A validator's own ValueError reads better without pydantic's "Value error, " prefix.
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        messages.append(f"{loc}: {msg}" if loc else msg)
    first_loc = exc.errors()[0]["loc"] if exc.errors() else ()
    # The field the client sent (`messages.0.content`), without the union member pydantic tried (`.str`).
    param = ".".join(str(p) for p in first_loc if isinstance(p, int) or p not in _TYPE_TAGS) or None
    return bad_request("Invalid request: " + "; ".join(messages), param=param)


_TYPE_TAGS = frozenset(
    {"str", "int", "float", "bool", "list[int]", "list[str]", "list[list[int]]", "dict[str,any]"}
)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
