"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and their HTTP statuses.

Framework-neutral: the engine's and the router's servers each render an `APIError` themselves. Types used:
`invalid_request_error` for every 4xx (404 unknown model carries code `model_not_found`, like OpenAI),
`server_error` for every 5xx, with code `overloaded`, `engine_dead`, `not_ready` or `internal_error`.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered to the client as-is; handlers raise it, the server renders `body()`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


def error_body(
    message: str, type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def overloaded(message: str = "The engine is overloaded; retry later.") -> APIError:
    # Retry-After lets the router and SDK clients back off without guessing.
    return APIError(503, message, code="overloaded", headers={"Retry-After": "1"})


def engine_dead(message: str = "The engine stopped; this server cannot generate.") -> APIError:
    return APIError(503, message, code="engine_dead")


def not_ready(message: str = "The model is not ready yet; retry later.") -> APIError:
    return APIError(503, message, code="not_ready", headers={"Retry-After": "1"})


def internal_error() -> APIError:
    # The message stays generic: the traceback goes to the log, not to the client.
    return APIError(500, "Internal server error.", code="internal_error")
