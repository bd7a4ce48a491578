"""A client request as the router parses it: refusals, fields, the session key and lazy prompt ids."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from microserve.router.request import Route, RoutedRequest
from microserve.server.errors import APIError


@pytest.mark.parametrize(
    "route, raw, message",
    [
        (Route.CHAT, b"", "empty"),
        (Route.CHAT, b"{", "not valid JSON"),
        (Route.CHAT, b"[]", "JSON object"),
        (Route.CHAT, b'{"messages": []}', "messages"),
        (Route.CHAT, b'{"messages": ["hi"]}', "messages.0"),
        (Route.CHAT, b'{"messages": [{"role": "user"}], "tool_choice": "required"}', "tool_choice"),
        (Route.CHAT, b'{"model": 3, "messages": [{}]}', "model"),
        (Route.COMPLETIONS, b'{"prompt": ""}', "prompt"),
        (Route.COMPLETIONS, b'{"prompt": 12}', "prompt"),
        (Route.COMPLETIONS, b'{"prompt": "x", "stream": "yes"}', "stream"),
        (Route.COMPLETIONS, b'{"prompt": "x", "max_tokens": "8"}', "max_tokens"),  # ranges: the engine's 400
    ],
)
def test_bad_requests_are_400(route: Route, raw: bytes, message: str) -> None:
    with pytest.raises(APIError, match=message) as exc:
        RoutedRequest.parse(route, raw)
    assert exc.value.status == 400


def test_request_fields_session_and_lazy_ids() -> None:
    calls: list[Any] = []

    def tokenize(model: str | None, route: Route, body: Any) -> list[int]:
        calls.append(model)
        return [1, 2, 3]

    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "u7", "stream": true}'
    req = RoutedRequest.parse(Route.CHAT, raw, {}, tokenize=tokenize)
    assert (req.model, req.stream, req.session_key, req.max_tokens) == ("m", True, "u7", None)
    assert req.upstream_body() is raw  # nothing changed: the client's bytes go as they are
    assert orjson.loads(req.upstream_body(return_token_ids=True))["return_token_ids"] is True
    assert req.prefix == "<|user|>hi\n" and calls == []  # no tokenizing unless asked
    assert req.prompt_ids == [1, 2, 3] and req.prompt_ids == [1, 2, 3] and calls == ["m"]
    req = RoutedRequest.parse(Route.COMPLETIONS, b'{"prompt": [5, 6]}', {"x-session-id": "s1"})
    assert (req.session_key, req.prefix, req.max_tokens) == ("s1", [5, 6], 16)
