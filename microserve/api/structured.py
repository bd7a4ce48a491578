"""Structured output fields: OpenAI's `response_format`, vLLM's `structured_outputs` and its legacy
`guided_*` fields, each turned into the one `GrammarSpec` the engine decodes under.

One constraint a request: two (say `response_format` json_schema and `guided_regex`) is a 400.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from microserve.engine.grammar import GrammarSpec
from microserve.engine.sampling import InvalidParams

GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
# Every request field that may carry a grammar: what the router carries to the engines it calls.
STRUCTURED_FIELDS = ("response_format", "structured_outputs", *GUIDED_FIELDS)


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's name, description, schema and strict."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of its constraints."""

    model_config = ConfigDict(extra="forbid", strict=True)

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def grammar_spec(
    response_format: ResponseFormat | None,
    structured: StructuredOutputs | None,
    guided: dict[str, Any],
) -> GrammarSpec | None:
    """The request's one grammar, or None; InvalidParams naming the field for a wrong shape."""
    specs = [s for s in (_from_response_format(response_format), _from_structured(structured)) if s]
    specs += [_from_guided(name, value) for name, value in guided.items() if value is not None]
    if len(specs) > 1:
        names = " and ".join(s.param.split(".")[0] for s in specs)
        raise InvalidParams(f"only one structured output constraint per request, got {names}", specs[1].param)
    return specs[0] if specs else None


def _from_response_format(fmt: ResponseFormat | None) -> GrammarSpec | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec.json_object("response_format")
    if fmt.json_schema is None:
        raise InvalidParams(
            "response_format of type json_schema needs json_schema", "response_format.json_schema"
        )
    schema = fmt.json_schema.schema_
    # OpenAI's schema is optional: without one, any JSON object.
    return GrammarSpec.json_schema(schema or {"type": "object"}, "response_format.json_schema.schema")


def _from_structured(so: StructuredOutputs | None) -> GrammarSpec | None:
    if so is None:
        return None
    given = {k: v for k, v in so.model_dump(by_alias=True).items() if v is not None and v is not False}
    if len(given) != 1:
        raise InvalidParams(
            "structured_outputs needs exactly one of json, regex, choice, grammar or json_object",
            "structured_outputs",
        )
    (name, value), param = next(iter(given.items())), f"structured_outputs.{next(iter(given))}"
    if name == "json_object":
        return GrammarSpec.json_object(param)
    return _from_guided(name, value, param)


def _from_guided(name: str, value: Any, param: str | None = None) -> GrammarSpec:
    param = param or name
    kind = name.removeprefix("guided_")
    if kind == "json":
        if isinstance(value, str):  # vLLM takes the schema as JSON text too
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise InvalidParams(f"{param} must be a JSON schema (an object)", param) from None
        return GrammarSpec.json_schema(value, param)
    if kind == "choice":
        return GrammarSpec.choice(value, param)
    if not isinstance(value, str) or not value:
        raise InvalidParams(f"{param} must be a non-empty string", param)
    return GrammarSpec.regex(value, param) if kind == "regex" else GrammarSpec.grammar(value, param)
