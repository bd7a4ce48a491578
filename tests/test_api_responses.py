"""The Responses view over chat: request -> chat body, chat SSE -> Responses events (however the bytes
are split), and the router's bounded per-tenant store."""

from __future__ import annotations

import orjson
import pytest

from microserve.api.errors import APIError
from microserve.api.responses import ResponseBuilder, ResponseEvents, chat_body, parse_responses_request
from microserve.router.responses import LocalResponses, Stored


def chat_frames(words: list[str], reason: str = "stop") -> bytes:
    def frame(body: dict) -> bytes:
        return b"data: " + orjson.dumps(body) + b"\n\n"

    out = [frame({"model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    out += [frame({"model": "m", "choices": [{"index": 0, "delta": {"content": w}}]}) for w in words]
    out.append(frame({"model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}))
    usage = {
        "prompt_tokens": 7,
        "completion_tokens": len(words),
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    out.append(frame({"model": "m", "choices": [], "usage": usage}))
    return b"".join(out) + b"data: [DONE]\n\n"


def events_of(data: bytes) -> list[dict]:
    events = []
    for block in data.split(b"\n\n"):
        if block:
            name, payload = block.split(b"\n")
            event = orjson.loads(payload.removeprefix(b"data: "))
            assert name == b"event: " + event["type"].encode()
            events.append(event)
    return events


def test_chat_body_carries_instructions_history_and_limits() -> None:
    req = parse_responses_request(
        {"model": "m", "input": "Hi", "instructions": "Be brief", "max_output_tokens": 5, "stream": True}
    )
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert chat_body(req, history) == {
        "model": "m",
        "messages": [{"role": "system", "content": "Be brief"}, *history, {"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 5,
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input.0"),
        ({"input": [{"type": "input_image"}]}, "input.0"),
        ({"input": "x", "text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "temperature": "hot"}, "temperature"),
        ({"input": "x", "nonsense": 1}, "nonsense"),
        ({}, "input"),
    ],
)
def test_bad_requests_name_the_field(body: dict, param: str) -> None:
    with pytest.raises(APIError) as err:
        parse_responses_request(body)
    assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize("step", [1, 7, 10_000])
def test_events_from_chat_frames_split_anywhere(step: int) -> None:
    req = parse_responses_request({"input": "x", "stream": True})
    events = ResponseEvents(ResponseBuilder(req))
    data = chat_frames(["Hel", "lo", "!"])
    out = b"".join(events.feed(data[i : i + step]) for i in range(0, len(data), step))
    got = events_of(out + events.closing())  # closing after [DONE] adds nothing
    assert [e["type"] for e in got] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    final = got[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello!" == got[-4]["text"]
    assert (
        final["usage"]["input_tokens"] == 7 and final["usage"]["input_tokens_details"]["cached_tokens"] == 3
    )
    assert final["status"] == "completed" and final["model"] == "m"


def test_length_is_incomplete_and_an_error_event_ends_the_stream() -> None:
    req = parse_responses_request({"input": "x", "stream": True})
    cut = events_of(ResponseEvents(ResponseBuilder(req)).feed(chat_frames(["a"], "length")))
    assert cut[-1]["type"] == "response.incomplete"
    assert cut[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    failing = ResponseEvents(ResponseBuilder(req))
    error = b'data: {"error": {"message": "engine died", "code": "engine_dead"}}\n\n'
    got = events_of(
        failing.feed(b"\n\n".join(chat_frames(["a"]).split(b"\n\n")[:2]) + b"\n\n" + error)
        + failing.closing()
    )
    assert got[-1] == {"type": "error", "sequence_number": len(got) - 1, "code": "engine_dead",
                       "message": "engine died", "param": None}  # fmt: skip


def test_store_is_bounded_and_per_tenant() -> None:
    store = LocalResponses(per_tenant=2, tenants=2)
    for i in range(3):
        store.put("a", f"r{i}", Stored({"id": i}, []))
    assert store.get("a", "r0") is None and store.get("a", "r2") is not None
    assert store.get("b", "r2") is None  # another tenant never sees it
    store.put("b", "x", Stored({}, []))
    store.get("a", "r1")  # a is now the most recently used tenant
    store.put("c", "y", Stored({}, []))
    assert store.get("b", "x") is None and store.get("a", "r1") is not None
    assert store.delete("a", "r1") and not store.delete("a", "r1")


def test_function_tools_and_call_items_become_chat() -> None:
    req = parse_responses_request(
        {
            "input": [
                {"role": "user", "content": "Weather in Paris and Oslo?"},
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "weather",
                    "arguments": '{"city": "Paris"}',
                },
                {
                    "type": "function_call",
                    "call_id": "c2",
                    "name": "weather",
                    "arguments": '{"city": "Oslo"}',
                },
                {"type": "function_call_output", "call_id": "c1", "output": "21C"},
                {"type": "function_call_output", "call_id": "c2", "output": "3C"},
            ],
            "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "weather"},
            "parallel_tool_calls": False,
        }
    )
    body = chat_body(req, [])
    assert body["tools"] == [
        {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert body["parallel_tool_calls"] is False
    call = body["messages"][1]
    assert call["role"] == "assistant" and call["content"] is None
    assert [c["id"] for c in call["tool_calls"]] == ["c1", "c2"]
    assert call["tool_calls"][1]["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    assert body["messages"][2:] == [
        {"role": "tool", "tool_call_id": "c1", "content": "21C"},
        {"role": "tool", "tool_call_id": "c2", "content": "3C"},
    ]


def test_tool_calls_become_function_call_items_whole_and_streamed() -> None:
    req = parse_responses_request({"input": "x", "stream": True})
    events = ResponseEvents(ResponseBuilder(req))

    def frame(delta: dict, reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        return b"data: " + orjson.dumps({"model": "m", "choices": [choice]}) + b"\n\n"

    head = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}
    args = {"index": 0, "function": {"arguments": '{"x": 1}'}}
    data = frame({"role": "assistant", "content": ""}) + frame({"content": "Let me see."})
    data += frame({"tool_calls": [head]}) + frame({"tool_calls": [args]}) + frame({}, "tool_calls")
    got = events_of(events.feed(data + b"data: [DONE]\n\n"))
    assert [e["type"] for e in got] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    output = got[-1]["response"]["output"]
    assert [i["type"] for i in output] == ["message", "function_call"]
    assert output[1] == {
        **output[1],
        "call_id": "call_a",
        "name": "f",
        "arguments": '{"x": 1}',
        "status": "completed",
    }
    assert got[8]["output_index"] == 1 and got[10]["arguments"] == '{"x": 1}'
    # the whole answer gives the same items; the conversation keeps the call
    chat = {"model": "m", "choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        "finish_reason": "tool_calls"}]}  # fmt: skip
    builder = ResponseBuilder(parse_responses_request({"input": "x"}))
    whole = builder.take_chat(chat)
    assert [i["type"] for i in whole["output"]] == ["function_call"] and whole["status"] == "completed"
    assert builder.chat_message() == {"role": "assistant", "content": None,
                                      "tool_calls": chat["choices"][0]["message"]["tool_calls"]}  # fmt: skip
