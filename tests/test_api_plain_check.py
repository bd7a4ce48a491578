"""The router's quick check of plain requests against the engine's request models: whatever it passes, the
model passes; what it does not pass is the model's to judge (and refuse)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict

from microserve.api.errors import APIError
from microserve.api.plain_check import PlainCheck, message_check, non_empty_list, non_empty_str
from microserve.api.protocol import (
    ACCEPTED_UNUSED,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    RequestModel,
    parse_request,
)
from microserve.router.request import _MODELS, Route

CHAT = _MODELS[Route.CHAT][1]
COMPLETION = _MODELS[Route.COMPLETIONS][1]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
)
roles = st.sampled_from(["system", "user", "assistant", "tool", "developer", "bot", "", None, 1])
parts = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": scalars}), max_size=2
)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": roles,
            "content": st.one_of(scalars, parts),
            "name": json_values,
            "tool_calls": json_values,
            "tool_call_id": json_values,
        },
    )
    | json_values,
    max_size=3,
)


def bodies(model: type[RequestModel], required: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    names = sorted({*model.model_fields, *ACCEPTED_UNUSED, "unknown_field", "best_of"} - set(required))
    return st.fixed_dictionaries(required, optional={name: json_values for name in names})


def near_plain(check: PlainCheck, required: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Bodies of the fields the check types, each with any value of a type it takes for that field (edge
    values included): most pass the check, and are held to the model."""
    typed: dict[type, st.SearchStrategy[Any]] = {
        str: st.text(max_size=4),
        int: st.integers(min_value=-(2**70), max_value=2**70),
        float: st.floats(allow_nan=True, allow_infinity=True),
        bool: st.booleans(),
        type(None): st.none(),
    }
    fields = {name: st.one_of(*(typed[t] for t in types)) for name, types in check._fields.items()}
    return st.fixed_dictionaries(required, optional=fields)


plain_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]) | roles},
        optional={"content": st.text(max_size=4) | scalars, "name": json_values, "tool_call_id": json_values},
    ),
    max_size=3,
)


def model_takes(model: type[RequestModel], body: dict[str, Any]) -> bool:
    try:
        parse_request(model, body, ranges=False)
    except APIError:
        return False
    return True


@settings(max_examples=600, deadline=None)
@given(bodies(ChatCompletionRequest, {"messages": messages | json_values}))
def test_what_the_chat_check_passes_the_chat_model_takes(body: dict[str, Any]) -> None:
    if CHAT.passes(body):
        assert model_takes(ChatCompletionRequest, body), body


@settings(max_examples=600, deadline=None)
@given(bodies(CompletionRequest, {"prompt": json_values | st.lists(st.integers(), max_size=2)}))
def test_what_the_completion_check_passes_the_completion_model_takes(body: dict[str, Any]) -> None:
    if COMPLETION.passes(body):
        assert model_takes(CompletionRequest, body), body


@settings(max_examples=1500, deadline=None)
@given(
    st.one_of(
        near_plain(CHAT, {"messages": plain_messages}),
        near_plain(COMPLETION, {"prompt": st.text(max_size=4) | scalars}),
    )
)
def test_what_either_check_passes_of_near_plain_requests_the_model_takes(body: dict[str, Any]) -> None:
    model, check = (ChatCompletionRequest, CHAT) if "messages" in body else (CompletionRequest, COMPLETION)
    if check.passes(body):
        assert model_takes(model, body), body


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 8},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}]},
        {"messages": [{"role": "assistant", "content": None, "tool_calls": []}, {"role": "user"}]},
        {"messages": [{"role": "user", "content": "Hi."}], "temperature": 0, "top_p": 0.9, "seed": 1},
        {"messages": [{"role": "user", "content": "Hi."}], "stream": True, "stop": "\n", "user": "u1"},
        {"messages": [{"role": "user", "content": "Hi."}], "max_completion_tokens": None, "stream": None},
    ],
)
def test_everyday_chat_requests_pass(body: dict[str, Any]) -> None:
    assert CHAT.passes(body)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "Hi."}], "frobnicate": 1},  # unknown: the model refuses
        {"messages": [{"role": "user", "content": "Hi."}], "metadata": {"a": "b"}},  # accepted, logged
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi."}]}]},  # parts: joined
        {"messages": [{"role": "user", "content": "Hi."}], "n": 2},  # judged: 1 <= n <= 128
        {"messages": [{"role": "user", "content": "Hi."}], "stop": ["a", "b"]},  # a list member
        {"messages": [{"role": "user", "content": "Hi."}], "temperature": "hot"},
        {"messages": [{"role": "user", "content": "Hi."}], "max_tokens": True},  # strict: not an int
        {"messages": [{"role": "user", "content": "Hi."}], "guided_regex": "a+"},  # a grammar
        {"messages": [{"role": "robot", "content": "Hi."}]},
        {"messages": []},
        {"messages": "Hi."},
        {"model": "m"},
    ],
)
def test_the_rest_is_left_to_the_model(body: dict[str, Any]) -> None:
    assert not CHAT.passes(body)


def test_plain_completions_pass_and_token_ids_go_to_the_model() -> None:
    assert COMPLETION.passes({"model": "m", "prompt": "Once", "max_tokens": 4, "echo": False})
    assert not COMPLETION.passes({"prompt": ""})
    assert not COMPLETION.passes({"prompt": [1, 2, 3]})
    assert not COMPLETION.passes({"prompt": "Once", "logprobs": 2})  # judged: 0 <= logprobs <= 20


def test_a_field_typed_with_a_constraint_is_left_to_the_model() -> None:
    # prior_output_tokens is a NonNegativeInt: a type test cannot tell 1 from -1.
    assert not COMPLETION.passes({"prompt": "Once", "prior_output_tokens": 1})
    assert not model_takes(CompletionRequest, {"prompt": "Once", "prior_output_tokens": -1})


def test_a_message_model_with_fields_the_check_does_not_know_is_refused_at_build() -> None:
    class Named(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)
        role: str
        content: str | None = None
        name: str | None = None

    with pytest.raises(TypeError, match="does not know"):
        message_check(Named)


def test_the_check_probes_types_from_the_model() -> None:
    class Tiny(RequestModel):
        prompt: str
        count: int = 0
        ratio: float | None = None
        label: str | list[str] | None = None

    check = PlainCheck(Tiny, {"prompt": non_empty_str}, {"prompt": "x"})
    assert check.passes({"prompt": "x", "count": 3, "ratio": 2, "label": "a"})
    assert check.passes({"prompt": "x", "count": None})  # null is the default (RequestModel's rule)
    assert not check.passes({"prompt": "x", "count": 1.5})
    assert not check.passes({"prompt": "x", "ratio": False})
    assert not check.passes({"prompt": "x", "label": ["a"]})  # valid, but the model's to say
    assert not check.passes({"prompt": "x", "other": 1})
    assert non_empty_list(non_empty_str)(["a"]) and not non_empty_list(non_empty_str)([])
    assert ChatMessage.model_fields.keys() == {"role", "content"}
