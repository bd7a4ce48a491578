"""Server-sent events as OpenAI streams them: `data: {json}` frames, a closing `data: [DONE]`."""

from __future__ import annotations

from typing import Any

import orjson

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_FRAME = b"data: [DONE]\n\n"
# nginx's "client closed request": shows in the access log that the answer was never delivered.
STATUS_CLIENT_CLOSED = 499


def frame(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"
