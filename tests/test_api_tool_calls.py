"""Tool calls read from an answer's text, whole and streamed in every split, in both syntaxes; and
the chat chunks that carry them (ids, name first, then arguments; finish_reason "tool_calls")."""

from __future__ import annotations

import json
from typing import Any

import pytest

from microserve.api.errors import APIError
from microserve.api.protocol import ChatCompletionRequest, parse_request
from microserve.api.tool_calls import (
    ChatToolCalls,
    SSEToolCalls,
    ToolCallStream,
    chat_tool_calls,
    parse_tool_calls,
    syntax_for_template,
    tool_choice_schema,
)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'


def test_syntax_follows_the_template() -> None:
    assert syntax_for_template("... <tool_call>\n{...}\n</tool_call> ...") == "hermes"
    assert syntax_for_template("{{ tools | tojson }}") == "json"
    assert syntax_for_template(None) == "json"


@pytest.mark.parametrize(
    ("text", "content", "names"),
    [
        (f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>", "Let me look.", ["get_weather"]),
        (f"<tool_call>{WEATHER}</tool_call>\n<tool_call>{WEATHER}</tool_call>", "", ["get_weather"] * 2),
        (f"<tool_call>\n{WEATHER}", "", ["get_weather"]),  # EOS before the closing tag
        ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
        ("No tools needed.", "No tools needed.", []),
    ],
)
def test_hermes_whole(text: str, content: str, names: list[str]) -> None:
    got_content, calls = parse_tool_calls(text, "hermes")
    assert got_content == content and [c.name for c in calls] == names
    for c in calls:
        assert json.loads(c.arguments) == {"city": "Paris", "unit": "C"}
        assert c.id.startswith("call_")


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (WEATHER, ["get_weather"]),
        ('  <|python_tag|>{"name": "f", "parameters": {"x": 1}}', ["f"]),
        (f"[{WEATHER}, {WEATHER}]", ["get_weather", "get_weather"]),
        ('{"name": "f", "arguments": "{\\"x\\": 1}"}', ["f"]),  # arguments sent as JSON text
        ('{"city": "Paris"}', []),  # JSON, but not a call
        ("Paris is sunny.", []),
    ],
)
def test_json_whole(text: str, names: list[str]) -> None:
    content, calls = parse_tool_calls(text, "json")
    assert [c.name for c in calls] == names
    assert content == ("" if names else text)


def streamed(text: str, syntax: Any, step: int, parallel: bool = True) -> tuple[str, list[dict[str, Any]]]:
    stream = ToolCallStream(syntax, parallel)
    deltas = []
    for i in range(0, len(text), step):
        deltas += stream.feed(text[i : i + step])
    deltas += stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            call = calls.setdefault(c["index"], {"name": "", "arguments": ""})
            if "id" in c:
                assert "id" not in call and c["function"]["arguments"] == ""  # id and name come first
                call["id"], call["name"] = c["id"], c["function"]["name"]
            call["arguments"] += c["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("step", [1, 3, 1000])
@pytest.mark.parametrize(
    ("text", "syntax"),
    [
        (f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>", "hermes"),
        (f"<tool_call>{WEATHER}</tool_call>\n<tool_call>{WEATHER}</tool_call>", "hermes"),
        ("a < b, and <tool_ca is not a tag", "hermes"),
        (f"<tool_call>\n{WEATHER}", "hermes"),
        (f"\n[{WEATHER}, {WEATHER}]", "json"),
        ("Plain {text} answer", "json"),
        ('{"city": "Paris"}', "json"),
    ],
)
def test_streamed_deltas_reassemble_to_the_whole_parse(text: str, syntax: Any, step: int) -> None:
    content, calls = streamed(text, syntax, step)
    whole_content, whole_calls = parse_tool_calls(text, syntax)
    assert content.strip() == whole_content.strip()
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    assert len({c["id"] for c in calls}) == len(calls)


def test_parallel_false_keeps_the_first_call() -> None:
    text = f"<tool_call>{WEATHER}</tool_call><tool_call>{WEATHER}</tool_call>"
    _, calls = streamed(text, "hermes", 5, parallel=False)
    assert len(calls) == 1
    body = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]
    }
    message = ChatToolCalls("hermes", parallel=False).whole(body)["choices"][0]["message"]
    assert len(message["tool_calls"]) == 1 and message["content"] is None


def chat_chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason, "stop_reason": None}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m", "choices": [choice]}


def test_chat_chunks_carry_calls_and_the_tool_calls_finish() -> None:
    rewrite = ChatToolCalls("hermes")
    pieces = ["Sure.", "<tool_", "call>", WEATHER[:10], WEATHER[10:], "</tool_call>"]
    out = rewrite.chunks(chat_chunk({"role": "assistant", "content": ""}))
    for piece in pieces:
        out += rewrite.chunks(chat_chunk({"content": piece}))
    out += rewrite.chunks(chat_chunk({}, "stop"))
    deltas = [c["choices"][0]["delta"] for c in out]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d for d in deltas if "content" in d][1:] == [{"content": "Sure."}]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""} and calls[0]["type"] == "function"
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
    assert out[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "tool_calls",
                                     "logprobs": None, "stop_reason": None}  # fmt: skip
    assert all(c["choices"][0]["finish_reason"] is None for c in out[:-1])


def test_length_keeps_its_finish_reason_and_no_call_keeps_stop() -> None:
    rewrite = ChatToolCalls("hermes")
    out = rewrite.chunks(chat_chunk({"content": '<tool_call>{"name": '}, "length"))
    assert out[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in out) == '<tool_call>{"name": '
    plain = ChatToolCalls("json").chunks(chat_chunk({"content": "Hello"}, "stop"))
    assert [c["choices"][0]["finish_reason"] for c in plain] == [None, "stop"]


def test_sse_bytes_split_anywhere() -> None:
    frames = (
        b"".join(
            b"data: " + json.dumps(c).encode() + b"\n\n"
            for c in [
                chat_chunk({"content": f"<tool_call>{WEATHER}"}),
                chat_chunk({"content": "</tool_call>"}, "stop"),
            ]
        )
        + b"data: [DONE]\n\n"
    )
    sse = SSEToolCalls(ChatToolCalls("hermes"))
    out = b"".join(sse.feed(frames[i : i + 7]) for i in range(0, len(frames), 7))
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert sum(1 for c in chunks if "tool_calls" in c["choices"][0]["delta"]) == 2


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}},
]  # fmt: skip


def test_forced_choices_decode_under_a_schema_of_calls() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    assert tool_choice_schema(TOOLS, "auto") is None and tool_choice_schema(TOOLS, None) is None
    named = tool_choice_schema(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert named is not None
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Paris"}}, named)
    for bad in (
        {"name": "now", "arguments": {}},
        {"name": "get_weather", "arguments": {}},
        {"name": "get_weather"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, named)
    required = tool_choice_schema(TOOLS, "required")
    assert required is not None
    calls = [{"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]
    jsonschema.validate(calls, required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], required)
    single = tool_choice_schema(TOOLS, "required", parallel=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(calls, single)
    # what the grammar lets through parses as calls, whatever the template's syntax
    content, parsed = parse_tool_calls(json.dumps(calls), "json")
    assert content == "" and [c.name for c in parsed] == ["now", "get_weather"]
    assert chat_tool_calls({"tools": TOOLS, "tool_choice": "required"}, "hermes") == ChatToolCalls("json")
    assert chat_tool_calls({"tools": TOOLS, "tool_choice": "auto"}, "hermes") == ChatToolCalls("hermes")
    assert chat_tool_calls({"tools": TOOLS, "tool_choice": "none"}, "hermes") is None


def test_a_forced_choice_is_the_request_grammar() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    named = parse_request(
        ChatCompletionRequest, {**chat, "tool_choice": {"type": "function", "function": {"name": "now"}}}
    )
    spec = named.grammar_spec()
    assert spec is not None and spec.param == "tool_choice"
    assert parse_request(ChatCompletionRequest, {**chat, "tool_choice": "auto"}).grammar_spec() is None
    with pytest.raises(APIError) as both:
        parse_request(
            ChatCompletionRequest,
            {**chat, "tool_choice": "required", "response_format": {"type": "json_object"}},
        )
    assert both.value.param == "tool_choice"
