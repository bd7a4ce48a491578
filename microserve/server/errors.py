"""The engine server's rendering of `microserve.api.errors` (aiohttp responses); the errors live there."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from microserve.api.errors import (
    APIError,
    bad_request,
    engine_dead,
    error_body,
    internal_error,
    model_not_found,
    not_ready,
    overloaded,
)

__all__ = [
    "APIError",
    "bad_request",
    "engine_dead",
    "error_body",
    "error_response",
    "internal_error",
    "json_response",
    "model_not_found",
    "not_ready",
    "overloaded",
]


def json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def error_response(exc: APIError) -> web.Response:
    return json_response(exc.body(), status=exc.status, headers=exc.headers)
