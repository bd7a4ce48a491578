"""A scripted OpenAI-compatible streaming server for the bench client and runner tests.

The `model` field picks the script: a clean stream, no usage, an error mid-stream, a cut, a 404, a stall."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer


def frame(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass
class FakeServer:
    token_delay: float = 0.005
    bodies: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    served: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "ok"}, {"id": "other"}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        number = self.served
        self.served += 1
        script = body["model"]
        if script == "missing":
            error = {"message": "The model `missing` does not exist.", "type": "NotFoundError", "code": 404}
            return web.json_response({"error": error}, status=404)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._stream(request, body, number, script)
        finally:
            self.in_flight -= 1

    async def _stream(
        self, request: web.Request, body: dict[str, Any], number: int, script: str
    ) -> web.StreamResponse:
        chat = "messages" in body
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if script == "slow":
            await asyncio.sleep(1.0)
        if chat:
            await resp.write(
                frame({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            )
        n = {"ok": body["max_tokens"], "nousage": body["max_tokens"], "empty": 0}.get(script, 2)
        for i in range(n):
            await asyncio.sleep(self.token_delay)
            text = f"a{number}.{i} "
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            await resp.write(frame({"choices": [choice], "usage": None}))
        await resp.write(b": keep-alive comment\n\n")
        if script == "midstream-error":
            await resp.write(frame({"error": {"message": "engine died", "type": "InternalServerError"}}))
            return resp
        if script == "cut":
            return resp
        if script == "garbage":
            await resp.write(frame({"choices": ["not an object"]}))
            return resp
        finish = (
            {"index": 0, "delta": {}, "finish_reason": "length"}
            if chat
            else {"text": "", "finish_reason": "length"}
        )
        await resp.write(frame({"choices": [finish]}))
        if script != "nousage" and body.get("stream_options", {}).get("include_usage"):
            prompt_tokens = len(orjson.dumps(body.get("messages") or body.get("prompt")))
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
            }
            await resp.write(frame({"choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def start(fake: FakeServer) -> TestServer:
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    return server
