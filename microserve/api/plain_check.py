"""A quick check derived from a request model, for the router's hot path: it passes a plain request (known
fields holding scalars of the types the model takes, chat messages of text) that the model would pass,
and says "ask the model" for anything else. Building the model cost the router 5.5 µs a chat request
(timeit), about a tenth of its Python per request; the check, a dictionary lookup and a type test per
field, 0.6 µs (docs/router-benchmark.md).

It never refuses and never answers for the model: what it does not pass is validated whole, so every
error, and every request it cannot judge, is the model's. The types each field takes are probed from the
model's own validator when the check is built; the fields whose values `check_supported` judges beyond
their type (`judged_fields` on the model) are never passed. tests/test_api_plain_check.py holds the two
to each other: whatever the check passes, the model passes.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

# One value of each JSON scalar type, and null: a field takes those its model accepts there.
_PROBES: tuple[Any, ...] = ("text", 1, 0.5, True, None)
_SCALARS = (str, int, float, bool)

FieldCheck = Callable[[Any], bool]


class PlainCheck:
    """`passes(body)`: True only if `model` would validate `body` (a decoded JSON object) and its
    `check_supported` accept it. `required` checks the fields the model requires; `example` is a plain
    request of only those, into which each other field is probed with a value of each scalar type."""

    __slots__ = ("_fields", "_required", "_required_names")

    def __init__(
        self, model: type[BaseModel], required: Mapping[str, FieldCheck], example: Mapping[str, Any]
    ) -> None:
        self._required = tuple(required.items())
        self._required_names = frozenset(required)
        self._fields: dict[str, tuple[type, ...]] = {}
        judged: frozenset[str] = getattr(model, "judged_fields", frozenset())
        validated = set(model.__pydantic_decorators__.field_validators)
        for name, info in model.model_fields.items():
            if name in required or name in judged or name in validated or info.metadata:
                continue
            if info.is_required() or not _scalar_union(info.annotation):
                continue
            accepted = tuple(type(p) for p in _PROBES if _takes(model, {**example, name: p}))
            if accepted:
                self._fields[name] = accepted

    def passes(self, body: dict[str, Any]) -> bool:
        for name, check in self._required:
            if not check(body.get(name)):
                return False
        if len(body) == len(self._required):
            return True
        fields = self._fields
        for name, value in body.items():
            accepted = fields.get(name)
            if accepted is None:
                if name in self._required_names:
                    continue
                return False  # unknown, judged, or not a scalar field: the model says
            if type(value) not in accepted:
                return False
        return True


def message_check(model: type[BaseModel]) -> FieldCheck:
    """For one chat message (a JSON object): a role the model's `Literal` allows, text or null content,
    and other keys only as extras of a model with `extra="allow"` (taken as they come)."""
    roles = frozenset(get_args(model.model_fields["role"].annotation))
    declared = frozenset(model.model_fields)
    if declared != {"role", "content"}:
        raise TypeError(f"{model.__name__} declares fields a chat message check does not know")
    extra_allowed = model.model_config.get("extra") == "allow"

    def check(message: Any) -> bool:
        if type(message) is not dict or message.get("role") not in roles:
            return False
        content = message.get("content")
        if content is not None and type(content) is not str:
            return False  # text parts are joined, and judged, by the model
        return extra_allowed or declared.issuperset(message)

    return check


def non_empty_list(item: FieldCheck) -> FieldCheck:
    def check(value: Any) -> bool:
        return type(value) is list and len(value) > 0 and all(map(item, value))  # map: no generator frame

    return check


def non_empty_str(value: Any) -> bool:
    return type(value) is str and value != ""


def _takes(model: type[BaseModel], body: dict[str, Any]) -> bool:
    try:
        request = model.__pydantic_validator__.validate_python(body)
        check = getattr(request, "check_supported", None)
        if check is not None:
            check()
    except (ValidationError, ValueError):  # an APIError is a ValueError too
        return False
    return True


def _scalar_union(annotation: Any) -> bool:
    """A scalar, or a union with at least one scalar member (a value of another member: the model says)."""
    if annotation in _SCALARS:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return any(arg in _SCALARS for arg in get_args(annotation))
    return False
