"""`tools`, assistant tool calls with null content and `tool` messages rendered through the chat template
byte-identically to transformers' `apply_chat_template(messages, tools=..., add_generation_prompt=True)`:
with the bundled model's template, and with Qwen2.5's and a Llama-3.1-style template that use tools.

The request goes the engine's way (the request model, then `chat_prompt_ids`); transformers gets the
same conversation with each call's `arguments` as an object, the form HF templates expect (vLLM hands
them over the same way), and null content as ""."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from microserve.api.prompt import body_prompt_ids, chat_prompt_ids
from microserve.api.protocol import ChatCompletionRequest, parse_request
from microserve.api.tokenize import TokenizeRequest, tokenize
from microserve.model.tokenizer import Tokenizer

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 (the template as published)

# Llama 3.1's way, shortened: tools as JSON in the first user turn, calls as {"name", "parameters"},
# results in the ipython role.
LLAMA31 = r"""{{- bos_token }}
{%- set ns = namespace(first_user=true) %}
{%- for message in messages %}
    {%- if message.role == 'user' and tools is not none and ns.first_user %}
        {%- set ns.first_user = false %}
        {{- '<|start_header_id|>user<|end_header_id|>\n\n' }}
        {{- "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n" }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\n\n' }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\n\n" }}
        {%- endfor %}
        {{- message.content | trim + '<|eot_id|>' }}
    {%- elif message.tool_calls is defined %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
        {{- '{"name": "' + call.name + '", "parameters": ' }}
        {{- call.arguments | tojson }}
        {{- '}<|eot_id|>' }}
    {%- elif message.role == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' }}
        {%- if message.content is mapping or message.content is iterable and message.content is not string %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city, now.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
# What an agent sends back: the call with null content, the tool's result, and the next question.
ROUND_TRIP: list[dict[str, Any]] = [
    {"role": "system", "content": "You help with the weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "user", "content": "And in °F?"},
]


def for_transformers(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = (
                ""  # null content is rendered as "" (vLLM's rule; the bundled template needs a string)
            )
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


@pytest.fixture(scope="module")
def tok(model_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(model_path)


@pytest.fixture(scope="module")
def ref(model_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)


def with_template(tok: Tokenizer, template: str | None) -> Tokenizer:
    if template is None:
        return tok
    return Tokenizer(tok.backend, eos_token="<|im_end|>", bos_token="<|im_start|>", chat_template=template)


@pytest.mark.slow
@pytest.mark.parametrize("template", [None, QWEN25, LLAMA31], ids=["bundled", "qwen2.5", "llama3.1"])
@pytest.mark.parametrize("messages", [ROUND_TRIP[:2], ROUND_TRIP], ids=["ask", "round_trip"])
def test_tools_render_as_transformers_does(
    tok: Tokenizer, ref: Any, template: str | None, messages: Any
) -> None:
    ours = with_template(tok, template)
    body = {"model": "m", "messages": messages, "tools": TOOLS, "tool_choice": "auto"}
    req = parse_request(ChatCompletionRequest, body)
    ids = chat_prompt_ids(ours, req.template_messages(), None, req.template_tools())
    theirs = ref.apply_chat_template(
        for_transformers(messages),
        tools=TOOLS,
        chat_template=template or ref.chat_template,
        add_generation_prompt=True,
        tokenize=False,
    )
    assert ours.decode(ids, skip_special_tokens=False) == theirs
    assert ids == ours.encode(theirs, add_special_tokens=False)
    # the router computes the same ids from the raw body (pd, prefix-aware routing)
    assert body_prompt_ids(ours, True, body) == ids
    if template is not None:
        assert "get_weather" in theirs and "Paris" in theirs.split("get_weather", 1)[1]


@pytest.mark.slow
def test_tokenize_renders_tools_as_a_chat_request_does(tok: Tokenizer) -> None:
    qwen = with_template(tok, QWEN25)
    body = {"messages": ROUND_TRIP, "tools": TOOLS}
    counted = tokenize(qwen, parse_request(TokenizeRequest, body), 1024)
    assert counted["tokens"] == body_prompt_ids(qwen, True, body)
    assert (
        counted["count"]
        > tokenize(qwen, parse_request(TokenizeRequest, {"messages": ROUND_TRIP}), 1024)["count"]
    )
