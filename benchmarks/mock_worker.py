"""A minimal OpenAI-compatible worker that answers at once: the router benchmark's backend. A chat request
with `"stream": true` is answered with `max_tokens` chunks (16 by default), each its own write, then the
usage chunk and [DONE].

Usage: python benchmarks/mock_worker.py PORT
"""

from __future__ import annotations

import asyncio
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


def _chunk(delta: dict[str, str], finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
    body |= {"choices": choices, **({"usage": usage} if usage else {})}
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def chat(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    body = orjson.loads(raw) if b'"stream"' in raw else {}  # whole answers as before: no parse
    if not body.get("stream"):
        return web.Response(body=CHAT, content_type="application/json")
    tokens = int(body.get("max_tokens") or 16)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(_chunk({"role": "assistant", "content": ""}))
    for i in range(tokens):
        await resp.write(_chunk({"content": "ok"}, "length" if i == tokens - 1 else None))
        await asyncio.sleep(0)  # each token its own write, as an engine's
    await resp.write(
        _chunk({}, usage={"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens})
    )
    await resp.write(b"data: [DONE]\n\n")
    return resp


def app() -> web.Application:
    a = web.Application()
    a.router.add_post("/v1/chat/completions", chat)
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
