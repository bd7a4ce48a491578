"""The structured output fields parsed into one GrammarSpec: OpenAI's response_format, vLLM's
structured_outputs and guided_*, with a 400 naming the field for every wrong shape."""

from __future__ import annotations

from typing import Any

import pytest

from microserve.api.errors import APIError
from microserve.api.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from microserve.engine.grammar import GrammarSpec

MESSAGES = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
SCHEMA_TEXT = '{"type": "object", "properties": {"a": {"type": "integer"}}}'


def json_schema(**fields: Any) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": fields}}


def spec(body: dict[str, Any], cls: type[Any] = ChatCompletionRequest) -> GrammarSpec | None:
    base = {"messages": MESSAGES} if cls is ChatCompletionRequest else {"prompt": "x"}
    return parse_request(cls, {**base, **body}).sampling_params(5).grammar


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": None}, None),
        ({"response_format": {"type": "json_object"}}, GrammarSpec.json_object()),
        (json_schema(name="a", schema=SCHEMA, strict=True), GrammarSpec.json_schema(SCHEMA)),
        (json_schema(name="a"), GrammarSpec.json_object()),
        ({"guided_json": SCHEMA}, GrammarSpec.json_schema(SCHEMA)),
        ({"guided_json": SCHEMA_TEXT}, GrammarSpec.json_schema(SCHEMA)),
        ({"guided_regex": "[0-9]+"}, GrammarSpec.regex("[0-9]+")),
        ({"guided_choice": ["yes", "no"]}, GrammarSpec.choice(["yes", "no"])),
        ({"guided_grammar": 'root ::= "a"'}, GrammarSpec.grammar('root ::= "a"')),
        ({"structured_outputs": {"json": SCHEMA}}, GrammarSpec.json_schema(SCHEMA)),
        ({"structured_outputs": {"regex": "a+"}}, GrammarSpec.regex("a+")),
        ({"structured_outputs": {"choice": ["x"]}}, GrammarSpec.choice(["x"])),
        ({"structured_outputs": {"grammar": "start: /a+/"}}, GrammarSpec.grammar("start: /a+/")),
        ({"structured_outputs": {"json_object": True}}, GrammarSpec.json_object()),
    ],
)  # fmt: skip
def test_each_field_gives_its_grammar(body: dict[str, Any], expected: GrammarSpec | None) -> None:
    assert spec(body) == expected
    assert spec(body, CompletionRequest) == expected  # completions take the same fields


def test_the_spec_names_the_field_it_came_from() -> None:
    got = spec({"structured_outputs": {"regex": "a+"}})
    assert got is not None and got.param == "structured_outputs.regex"
    got = spec({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}})
    assert got is not None and got.param == "response_format.json_schema.schema"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (json_schema(schema=SCHEMA), "response_format.json_schema.name"),
        (json_schema(name="a", schema=[1]), "response_format.json_schema.schema"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": 3}, "guided_json"),
        ({"guided_regex": ""}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a", 1]}, "guided_choice.1"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
        ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ],
)  # fmt: skip
def test_a_wrong_shape_is_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    for ranges in (True, False):  # the router (no ranges) refuses the same shapes
        with pytest.raises(APIError) as info:
            parse_request(ChatCompletionRequest, {"messages": MESSAGES, **body}, ranges=ranges)
        assert info.value.status == 400 and info.value.param == param
