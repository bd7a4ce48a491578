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


class FunctionTool(BaseModel):
    """A Responses function tool: the function's fields at the top level (chat nests them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def for_chat(self) -> dict[str, Any]:
        function = self.model_dump(exclude_none=True, exclude={"type"})
        return {"type": "function", "function": function}


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    name: str


class ResponsesRequest(RequestModel):
    """POST /v1/responses: text in, text out (a string, or a list of message and function-call items),
    with function tools."""

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
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    tools: list[FunctionTool] | None = None
    truncation: Literal["disabled"] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
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
        input_messages(self.input)  # each item's shape, before anything runs

    def chat_tool_choice(self) -> Any:
        choice = self.tool_choice
        if isinstance(choice, NamedFunction):
            return {"type": "function", "function": {"name": choice.name}}
        return choice


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
    """The request's `input` as chat messages (a 400 naming the item for anything else): message
    items, and function calls with their outputs (an agent sending back what a tool said)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input.{i}"
        kind = item.get("type", "message") if isinstance(item, dict) else type(item).__name__
        if kind == "function_call":
            call = _function_call(item, where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            continue
        if kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not isinstance(output, str):
                raise bad_request(f"{where}: call_id and output must be strings.", param=where)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
            continue
        if kind != "message":
            raise bad_request(f"{where}: only message and function call items are supported, got {kind!r}.",
                              param=where)  # fmt: skip
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise bad_request(f"{where}.role must be user, assistant, system or developer.", param=where)
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _item_text(item.get("content"), f"{where}.content")})  # fmt: skip
    if not messages:
        raise bad_request("input must contain at least one message.", param="input")
    return messages


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
    if not all(isinstance(v, str) for v in (call_id, name, arguments)):
        raise bad_request(f"{where}: call_id, name and arguments must be strings.", param=where)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


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
        "tools": [t.for_chat() for t in req.tools] if req.tools else None,
        "tool_choice": req.chat_tool_choice(),
        "parallel_tool_calls": req.parallel_tool_calls,
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
    """One `response` object being built: its fixed fields from the request, its output items (a
    message, function calls) from the chat answer."""

    req: ResponsesRequest
    id: str = field(default_factory=new_response_id)
    created_at: int = field(default_factory=lambda: int(time.time()))
    model: str | None = None
    items: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        return "incomplete" if self.finish_reason == "length" else "completed"

    @property
    def text(self) -> str:
        return "".join(p["text"] for i in self.items if i["type"] == "message" for p in i["content"])

    def add_message(self, text: str | None, status: str = "completed") -> dict[str, Any]:
        content = [] if text is None else [output_text(text)]
        item = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": status, "role": "assistant",
                "content": content}  # fmt: skip
        self.items.append(item)
        return item

    def add_call(self, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
        item = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": status,
                "call_id": call_id, "name": name, "arguments": arguments}  # fmt: skip
        self.items.append(item)
        return item

    def chat_message(self) -> dict[str, Any]:
        """The answer as the chat message the conversation keeps."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        calls = [i for i in self.items if i["type"] == "function_call"]
        if calls:
            message["content"] = self.text or None
            message["tool_calls"] = [
                {
                    "id": c["call_id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in calls
            ]
        return message

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
            "output": self.items if done else [],
            "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": req.store,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": _plain_choice(req.tool_choice),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": "disabled",
            "usage": self.usage if done else None,
            "user": req.user,
            "metadata": req.metadata or {},
        }

    def take_chat(self, chat: dict[str, Any]) -> dict[str, Any]:
        """Fill from a whole chat completion; the whole `response` object."""
        choice = chat["choices"][0]
        message = choice["message"]
        self.model = chat.get("model")
        if message.get("content") or not message.get("tool_calls"):
            self.add_message(message.get("content") or "")
        for call in message.get("tool_calls") or []:
            self.add_call(call["id"], call["function"]["name"], call["function"]["arguments"])
        self.finish_reason = choice.get("finish_reason")
        self.usage = responses_usage(chat.get("usage") or {})
        return self.body()


def _plain_choice(choice: Any) -> Any:
    if isinstance(choice, BaseModel):
        return choice.model_dump()
    return choice or "auto"


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

    Frames may arrive split or joined in any way: bytes are buffered up to each blank line. Text opens
    a message item, each tool call a function_call item (the one before is closed first). The last
    event is `response.completed` (or `response.incomplete` when max_output_tokens cut the answer); a
    chat error event becomes an `error` event, and no more follows."""

    builder: ResponseBuilder
    sequence: int = 0
    started: bool = False
    finished: bool = False
    _open: dict[str, Any] | None = None  # the output item being streamed
    _calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # chat tool-call index -> item
    _buffer: bytes = b""

    def _event(self, type_: str, **fields: Any) -> bytes:
        data = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + type_.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def opening(self) -> bytes:
        b = self.builder
        self.started = True
        return self._event("response.created", response=b.body("in_progress")) + self._event(
            "response.in_progress", response=b.body("in_progress")
        )

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
        events = [b"" if self.started else self.opening()]
        if "error" in chunk:
            self.finished = True
            err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            events.append(self._event("error", code=err.get("code"), message=str(err.get("message")),
                                      param=err.get("param")))  # fmt: skip
            return b"".join(events)
        b = self.builder
        b.model = chunk.get("model") or b.model
        if chunk.get("usage"):
            b.usage = responses_usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events.append(self._text(delta["content"]))
            for call in delta.get("tool_calls") or []:
                events.append(self._call(call))
            if choice.get("finish_reason"):
                b.finish_reason = choice["finish_reason"]
        return b"".join(events)

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"output_index": self.builder.items.index(item), "item_id": item["id"]}

    def _open_message(self) -> bytes:
        out = self._close()
        item = self._open = self.builder.add_message(None, "in_progress")
        out += self._event("response.output_item.added", output_index=len(self.builder.items) - 1, item=item)
        item["content"].append(output_text(""))
        return out + self._event("response.content_part.added", **self._where(item), content_index=0,
                                 part=output_text(""))  # fmt: skip

    def _text(self, text: str) -> bytes:
        out = b"" if self._open is not None and self._open["type"] == "message" else self._open_message()
        assert self._open is not None
        self._open["content"][0]["text"] += text
        return out + self._event("response.output_text.delta", **self._where(self._open), content_index=0,
                                 delta=text, logprobs=[])  # fmt: skip

    def _call(self, delta: dict[str, Any]) -> bytes:
        function = delta.get("function") or {}
        index = int(delta.get("index") or 0)
        out = b""
        item = self._calls.get(index)
        if item is None:
            out += self._close()
            item = self._open = self._calls[index] = self.builder.add_call(
                delta.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                function.get("name") or "",
                "",
                "in_progress",
            )
            out += self._event(
                "response.output_item.added", output_index=len(self.builder.items) - 1, item=item
            )
        arguments = function.get("arguments") or ""
        if arguments:
            item["arguments"] += arguments
            out += self._event("response.function_call_arguments.delta", **self._where(item), delta=arguments)
        return out

    def _close(self) -> bytes:
        item, self._open = self._open, None
        if item is None:
            return b""
        item["status"] = "completed"
        where = self._where(item)
        if item["type"] == "function_call":
            return self._event("response.function_call_arguments.done", **where, name=item["name"],
                               arguments=item["arguments"]) + self._event(
                "response.output_item.done", output_index=where["output_index"], item=item)  # fmt: skip
        part = item["content"][0]
        return b"".join([
            self._event("response.output_text.done", **where, content_index=0, text=part["text"],
                        logprobs=[]),
            self._event("response.content_part.done", **where, content_index=0, part=part),
            self._event("response.output_item.done", output_index=where["output_index"], item=item),
        ])  # fmt: skip

    def closing(self) -> bytes:
        """The closing events, once the chat stream said [DONE]."""
        if self.finished:
            return b""
        self.finished = True
        b = self.builder
        out = b"" if self.started else self.opening()
        if not b.items:  # an empty answer is still one (empty) message
            out += self._open_message()
        out += self._close()
        return out + self._event(f"response.{b.status}", response=b.body())
