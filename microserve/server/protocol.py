"""The OpenAI request models and response shapes now live in `microserve.api`; kept for old imports."""

from microserve.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    RequestModel,
    StreamOptions,
    parse_request,
)
from microserve.api.shapes import ChatShape, CompletionShape, ResponseShape

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "ChatShape",
    "CompletionRequest",
    "CompletionShape",
    "RequestModel",
    "ResponseShape",
    "StreamOptions",
    "parse_request",
]
