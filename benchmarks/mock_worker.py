"""A minimal OpenAI-compatible worker that answers at once: the router benchmark's backend.

Usage: python benchmarks/mock_worker.py PORT
"""

from __future__ import annotations

import sys

import orjson
from aiohttp import web

MODEL = "mock"
CHAT = orjson.dumps(
    {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }
)
COMPLETION = orjson.dumps(
    {
        "id": "cmpl-mock",
        "object": "text_completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }
)
MODELS = orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "mock"}]})
INFO = orjson.dumps({"model_path": MODEL, "is_generation": True})


def fixed(body: bytes):
    async def handler(request: web.Request) -> web.Response:
        if request.can_read_body:
            await request.read()
        return web.Response(body=body, content_type="application/json")

    return handler


def app() -> web.Application:
    a = web.Application()
    a.router.add_post("/v1/chat/completions", fixed(CHAT))
    a.router.add_post("/v1/completions", fixed(COMPLETION))
    a.router.add_post("/generate", fixed(COMPLETION))
    a.router.add_get("/v1/models", fixed(MODELS))
    for path in ("/health", "/health_generate", "/ready", "/get_model_info", "/get_server_info"):
        a.router.add_get(path, fixed(INFO))
    return a


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
