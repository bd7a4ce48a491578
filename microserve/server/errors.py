"""The engine's errors are `microserve.api.errors` (shared with the router); kept for old imports."""

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
    "internal_error",
    "model_not_found",
    "not_ready",
    "overloaded",
]
