"""Tool calls read from a chat answer's text, in the syntax the model's chat template teaches:

- `hermes` (Hermes, Qwen2.5, any template that mentions `<tool_call>`): each call is
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; text outside the tags is content.
- `json` (Llama-3.1-style and every other template): the whole answer is one JSON object
  `{"name": ..., "arguments"|"parameters": {...}}` (after an optional `<|python_tag|>`) or a list of
  them; any other answer is content.

`ChatToolCalls` rewrites chat answers (whole, or chunk by chunk as they stream) so that calls leave as
OpenAI `tool_calls` (streamed as deltas: index, id and name first, then the arguments) with
`finish_reason: "tool_calls"`. The engine applies it to its own answers, the router to the chat answers
it builds from an engine's completion stream (pd, migration, continuation): one implementation.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

Syntax = Literal["hermes", "json"]
SYNTAXES: tuple[Syntax, ...] = ("hermes", "json")

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def syntax_for_template(source: str | None) -> Syntax:
    """The tool-call syntax a chat template teaches its model."""
    return "hermes" if source and _OPEN in source else "json"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=new_call_id)

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def call_from_json(value: Any) -> ToolCall | None:
    """A call from a decoded `{"name", "arguments"|"parameters"}` object; None for anything else."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _calls_in_json(text: str) -> list[ToolCall] | None:
    text = text.strip().removeprefix(_PYTHON_TAG).strip()
    if not text.startswith(("{", "[")):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [call_from_json(v) for v in items]
    return [c for c in calls if c is not None] if items and all(calls) else None


def parse_tool_calls(text: str, syntax: Syntax) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole answer; an answer with no well-formed call is all content."""
    if syntax == "json":
        json_calls = _calls_in_json(text)
        return ("", json_calls) if json_calls else (text, [])
    calls: list[ToolCall] = []
    for match in _HERMES.finditer(text):
        call = _calls_in_json(match.group(1))
        if call is None:
            return text, []
        calls.extend(call)
    if not calls:
        return text, []
    return text[: text.index(_OPEN)].strip(), calls


def _held_prefix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker` (to be held back)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass(slots=True)
class ToolCallStream:
    """One choice's text as it streams, turned into OpenAI deltas: content, and calls once complete."""

    syntax: Syntax
    parallel: bool = True  # False: only the first call is kept
    calls: int = 0
    _pending: str = ""
    _inside: bool = False  # hermes: inside <tool_call>…
    _mode: str = ""  # json: "" undecided, "content", or "json" (held whole until the end)

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.syntax == "hermes" and not self._inside and not self._pending and "<" not in text:
            return self._content(text)  # the common token: plain text, nothing held
        self._pending += text
        if self.syntax == "json":
            return self._feed_json()
        out: list[dict[str, Any]] = []
        while True:
            if not self._inside:
                at = self._pending.find(_OPEN)
                if at < 0:
                    keep = _held_prefix(self._pending, _OPEN)
                    out += self._content(self._pending[: len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep :]
                    return out
                out += self._content(self._pending[:at].rstrip() if self.calls == 0 else "")
                self._pending, self._inside = self._pending[at + len(_OPEN) :], True
            end = self._pending.find(_CLOSE)
            if end < 0:
                return out
            out += self._emit(self._pending[:end], _OPEN + self._pending[: end + len(_CLOSE)])
            self._pending, self._inside = self._pending[end + len(_CLOSE) :], False

    def finish(self) -> list[dict[str, Any]]:
        """What is still held when the answer ends."""
        pending, self._pending = self._pending, ""
        if self.syntax == "json":
            if self._mode == "json":
                return self._emit(pending, pending)
            return self._content(pending)
        if self._inside:  # the model ended without closing the tag
            self._inside = False
            return self._emit(pending, _OPEN + pending)
        return self._content(pending)

    def _feed_json(self) -> list[dict[str, Any]]:
        if not self._mode:
            head = self._pending.lstrip()
            if not head or (len(head) < len(_PYTHON_TAG) and _PYTHON_TAG.startswith(head)):
                return []  # still undecided
            self._mode = "json" if head.startswith(("{", "[", _PYTHON_TAG)) else "content"
        if self._mode == "json":
            return []
        pending, self._pending = self._pending, ""
        return self._content(pending)

    def _content(self, text: str) -> list[dict[str, Any]]:
        return [{"content": text}] if text else []

    def _emit(self, payload: str, raw: str) -> list[dict[str, Any]]:
        calls = _calls_in_json(payload)
        if calls is None:
            return self._content(raw)  # not a well-formed call: the client gets the text as written
        out = []
        for call in calls:
            if self.calls and not self.parallel:
                break
            head = {"index": self.calls, "id": call.id, "type": "function",
                    "function": {"name": call.name, "arguments": ""}}  # fmt: skip
            out.append({"tool_calls": [head]})
            out.append({"tool_calls": [{"index": self.calls, "function": {"arguments": call.arguments}}]})
            self.calls += 1
        return out


@dataclass(slots=True)
class ChatToolCalls:
    """Rewrites one chat answer's content into tool calls: whole (`whole`) or chunk by chunk (`chunks`)."""

    syntax: Syntax
    parallel: bool = True
    _streams: dict[int, ToolCallStream] = field(default_factory=dict)

    def whole(self, body: dict[str, Any]) -> dict[str, Any]:
        for choice in body.get("choices") or []:
            message = choice.get("message") or {}
            content, calls = parse_tool_calls(message.get("content") or "", self.syntax)
            if not calls:
                continue
            if not self.parallel:
                calls = calls[:1]
            message["content"] = content or None
            message["tool_calls"] = [c.body() for c in calls]
            if choice.get("finish_reason") != "length":
                choice["finish_reason"] = "tool_calls"
        return body

    def chunks(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks to send for one chat chunk: held content leaves later, a call once complete."""
        choices = chunk.get("choices")
        if not choices:
            return [chunk]
        choice = choices[0]
        index = int(choice.get("index") or 0)
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = ToolCallStream(self.syntax, self.parallel)
        delta = dict(choice.get("delta") or {})
        text = delta.pop("content", None)
        reason = choice.get("finish_reason")
        if not text and reason is None:
            return [chunk]  # the role chunk, or one that carries only ids or logprobs
        deltas = stream.feed(text) if text else []
        if reason is not None:
            deltas += stream.finish()
        if delta:  # a role beside the content: keep it on the first delta
            deltas = [{**delta, **(deltas[0] if deltas else {"content": ""})}, *deltas[1:]]
        out = []
        extra = {
            k: v for k, v in choice.items() if k not in ("index", "delta", "finish_reason", "stop_reason")
        }
        keeps = bool(choice.get("logprobs") or choice.get("token_ids"))
        if not deltas and keeps:
            deltas = [{"content": ""}]  # its logprobs and ids still reach the client
        for i, d in enumerate(deltas):
            first = {**extra} if i == 0 else {k: ([] if k == "token_ids" else None) for k in extra}
            body = {"index": index, "delta": d, **first, "finish_reason": None}
            if "stop_reason" in choice:
                body["stop_reason"] = None
            out.append({**chunk, "choices": [body]})
        if reason is not None:
            if stream.calls and reason != "length":
                reason = "tool_calls"
            end = {"index": index, "delta": {}, "finish_reason": reason}
            if "logprobs" in choice:
                end["logprobs"] = None
            if "stop_reason" in choice:
                end["stop_reason"] = choice["stop_reason"]
            if "token_ids" in choice:
                end["token_ids"] = []
            out.append({**chunk, "choices": [end]})
        return out


@dataclass(slots=True)
class SSEToolCalls:
    """`ChatToolCalls` over a chat answer's SSE bytes, split or joined in any way (the router's side)."""

    calls: ChatToolCalls
    _buffer: bytes = b""

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = []
        while b"\n\n" in self._buffer:
            frame, self._buffer = self._buffer.split(b"\n\n", 1)
            if not frame.startswith(b"data: {"):
                out.append(frame + b"\n\n")  # [DONE], comments, other fields
                continue
            out += [b"data: " + orjson.dumps(c) + b"\n\n" for c in self.calls.chunks(orjson.loads(frame[6:]))]
        return b"".join(out)


def chat_tool_calls(body: dict[str, Any], syntax: Any) -> ChatToolCalls | None:
    """The rewriter for a raw chat request body (None when its answer is not read for tool calls).
    A forced choice (required, or a named function) is written in the grammar's JSON, whatever the
    template teaches."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools or choice == "none":
        return None
    syntax = "json" if forces_call(choice) else syntax if syntax in SYNTAXES else "json"
    return ChatToolCalls(syntax, parallel=body.get("parallel_tool_calls") is not False)


def forces_call(tool_choice: Any) -> bool:
    """ "required" or a named function (a dict, or the request model's object)."""
    return tool_choice is not None and tool_choice not in ("none", "auto")


# The most calls a forced answer holds: a small model, once it may call again, tends to repeat its
# call until max_tokens; a bound lets the answer end with calls that parse.
FORCED_MAX_CALLS = 4


def tool_choice_schema(
    tools: list[dict[str, Any]], tool_choice: Any, parallel: bool = True
) -> dict[str, Any] | None:
    """The JSON schema the answer is decoded under when `tool_choice` forces a call (None otherwise):
    a named function -> one `{"name", "arguments"}` object for it; "required" -> a list of one (with
    parallel calls, up to FORCED_MAX_CALLS) such objects, each for one of `tools`. `arguments` follows the
    function's `parameters` schema, so they always parse and match it."""
    if not forces_call(tool_choice) or not tools:
        return None
    functions = [t["function"] for t in tools]
    if tool_choice != "required":
        name = tool_choice["function"]["name"]
        named = [f for f in functions if f["name"] == name]
        return _call_schema(named[0]) if named else None  # the request model says what is wrong
    calls = [_call_schema(f) for f in functions]
    most = FORCED_MAX_CALLS if parallel else 1
    return {"type": "array", "minItems": 1, "maxItems": most, "items": {"anyOf": calls}}


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [function["name"]]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
