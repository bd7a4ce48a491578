"""OpenAI's Responses API (`/v1/responses`) as a view over chat completions: the request becomes a chat
request, the chat answer (whole or streamed) becomes a `response` object or the Responses stream events.

Pure logic, no I/O: the router's handler (`router/responses.py`) keeps the conversations and runs the
chat request through its own dispatch, so admission, tenants, retries and continuation all apply.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from microserve.api.errors import bad_request
from microserve.api.protocol import RequestModel, validation_error

# Text parts a message item may carry: what a client sends, and the assistant's own output sent back.
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


class ResponsesRequest(RequestModel):
    """POST /v1/responses: text in, text out (a string, or a list of message items)."""

    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    tool_choice: Literal["none", "auto"] | None = None
    tools: list[Any] | None = None
    truncation: Literal["disabled"] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise bad_request("tools are not supported on /v1/responses yet; use /v1/chat/completions.",
                              param="tools")  # fmt: skip
        fmt = (self.text or {}).get("format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise bad_request("Only text.format {'type': 'text'} is supported here; for JSON use "
                              "/v1/chat/completions with response_format.", param="text.format")  # fmt: skip
        if self.reasoning:
            raise bad_request("reasoning is not supported by this model.", param="reasoning")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise bad_request("max_output_tokens must be at least 1.", param="max_output_tokens")
        if isinstance(self.input, str) and not self.input:
            raise bad_request("input must not be empty.", param="input")


class _InputPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


def parse_responses_request(body: Any) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        request = ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    request.check_supported()
    return request


def input_messages(value: str | list[Any]) -> list[dict[str, Any]]:
    """The request's `input` as chat messages (a 400 naming the item for anything else)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages = []
    for i, item in enumerate(value):
        where = f"input.{i}"
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            kind = item.get("type") if isinstance(item, dict) else type(item).__name__
            raise bad_request(f"{where}: only message items are supported, got {kind!r}.", param=where)
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise bad_request(f"{where}.role must be user, assistant, system or developer.", param=where)
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _item_text(item.get("content"), f"{where}.content")})  # fmt: skip
    if not messages:
        raise bad_request("input must contain at least one message.", param="input")
    return messages


def _item_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of text parts.", param=where)
    texts = []
    for j, raw in enumerate(content):
        try:
            part = _InputPart.model_validate(raw)
        except ValidationError:
            part = None
        if part is None or part.type not in _TEXT_PARTS or part.text is None:
            kind = raw.get("type") if isinstance(raw, dict) else type(raw).__name__
            raise bad_request(f"{where}.{j}: only text parts are supported, got {kind!r}.", param=where)
        texts.append(part.text)
    return "\n".join(texts)


def chat_body(req: ResponsesRequest, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completion request that answers `req` after the conversation `history`."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    messages += history + input_messages(req.input)
    body: dict[str, Any] = {"messages": messages, "stream": req.stream}
    optional = {
        "model": req.model,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "user": req.user,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if req.stream:
        body["stream_options"] = {"include_usage": True}  # response.completed carries the usage
    return body


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


@dataclass(slots=True)
class ResponseBuilder:
    """One `response` object being built: its fixed fields from the request, its output from the chat."""

    req: ResponsesRequest
    id: str = field(default_factory=new_response_id)
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))
    model: str | None = None
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    def message(self, status: str, text: str | None = None) -> dict[str, Any]:
        content = [] if text is None else [output_text(text)]
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant",
                "content": content}  # fmt: skip

    @property
    def status(self) -> str:
        return "incomplete" if self.finish_reason == "length" else "completed"

    def body(self, status: str | None = None) -> dict[str, Any]:
        """The `response` object; `status` "in_progress" while streaming (no output yet)."""
        status = status or self.status
        req = self.req
        done = status != "in_progress"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if done else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model or req.model,
            "output": [self.message(status, self.text)] if done else [],
            "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": req.store,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": [],
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": "disabled",
            "usage": self.usage if done else None,
            "user": req.user,
            "metadata": req.metadata or {},
        }

    def take_chat(self, chat: dict[str, Any]) -> dict[str, Any]:
        """Fill from a whole chat completion; the whole `response` object."""
        choice = chat["choices"][0]
        self.model = chat.get("model")
        self.text = choice["message"].get("content") or ""
        self.finish_reason = choice.get("finish_reason")
        self.usage = responses_usage(chat.get("usage") or {})
        return self.body()


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def responses_usage(usage: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


@dataclass(slots=True)
class ResponseEvents:
    """Chat completion SSE frames in, Responses SSE events out (`event: <type>` + `data: {...}`).

    Frames may arrive split or joined in any way: bytes are buffered up to each blank line. The last
    event is `response.completed` (or `response.incomplete` when max_output_tokens cut the answer);
    a chat error event becomes an `error` event, and no more follows."""

    builder: ResponseBuilder
    sequence: int = 0
    started: bool = False
    finished: bool = False
    _buffer: bytes = b""

    def _event(self, type_: str, **fields: Any) -> bytes:
        data = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + type_.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def _item(self) -> dict[str, Any]:
        return {"output_index": 0, "item_id": self.builder.message_id, "content_index": 0}

    def opening(self) -> bytes:
        b = self.builder
        self.started = True
        return b"".join([
            self._event("response.created", response=b.body("in_progress")),
            self._event("response.in_progress", response=b.body("in_progress")),
            self._event("response.output_item.added", output_index=0, item=b.message("in_progress")),
            self._event("response.content_part.added", **self._item(), part=output_text("")),
        ])  # fmt: skip

    def feed(self, data: bytes) -> bytes:
        """The events for these chat SSE bytes (b"" while a frame is incomplete)."""
        self._buffer += data
        out = []
        while b"\n\n" in self._buffer and not self.finished:
            frame, self._buffer = self._buffer.split(b"\n\n", 1)
            out.append(self._frame(frame))
        return b"".join(out)

    def _frame(self, frame: bytes) -> bytes:
        payloads = [line[5:].strip() for line in frame.split(b"\n") if line.startswith(b"data:")]
        if not payloads or payloads[0] == b"[DONE]":
            return self.closing() if payloads else b""
        chunk = orjson.loads(payloads[0])
        opening = b"" if self.started else self.opening()
        if "error" in chunk:
            self.finished = True
            err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            return opening + self._event("error", code=err.get("code"), message=str(err.get("message")),
                                         param=err.get("param"))  # fmt: skip
        b = self.builder
        b.model = chunk.get("model") or b.model
        if chunk.get("usage"):
            b.usage = responses_usage(chunk["usage"])
        events = [opening]
        for choice in chunk.get("choices") or []:
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                b.text += delta
                events.append(self._event("response.output_text.delta", **self._item(), delta=delta,
                                          logprobs=[]))  # fmt: skip
            if choice.get("finish_reason"):
                b.finish_reason = choice["finish_reason"]
        return b"".join(events)

    def closing(self) -> bytes:
        """The closing events, once the chat stream said [DONE]."""
        if self.finished:
            return b""
        self.finished = True
        b = self.builder
        status = b.status
        return b"".join([
            b"" if self.started else self.opening(),
            self._event("response.output_text.done", **self._item(), text=b.text, logprobs=[]),
            self._event("response.content_part.done", **self._item(), part=output_text(b.text)),
            self._event("response.output_item.done", output_index=0, item=b.message(status, b.text)),
            self._event(f"response.{status}", response=b.body()),
        ])  # fmt: skip
