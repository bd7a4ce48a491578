"""A tiny OpenAI-compatible server on loopback, standing in for vLLM or llama.cpp server in router tests.

Its tokens follow from the position alone (at sequence length p: id 1000 + p, text " w{p}"), so a stream
continued elsewhere from prompt + generated ids must read exactly like one that never broke. It can fail
on purpose: error statuses, dying mid-stream, answering slowly; and it records what it was sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from microserve.router.app import RouterServer
from microserve.router.router import Router

CHAT_PROMPT = [1, 2, 3]  # what every chat prompt "tokenizes" to


def token(position: int) -> tuple[int, str]:
    return 1000 + position, f" w{position}"


def frame(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


class FakeOpenAI:
    def __init__(self, model: str = "fake") -> None:
        self.model = model
        self.calls: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.statuses: list[int] = []  # answer these statuses first, one per request
        self.die_after: int | None = None  # close the connection after this many tokens
        self.error_after: int | None = None  # send an SSE error event after this many tokens
        self.delay = 0.0  # seconds between tokens
        self.streaming = asyncio.Event()  # set once a stream has sent a token
        self.aborted = asyncio.Event()  # set when a client (the router) left a stream early
        self.url = ""
        self._server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._health)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        return app

    async def start(self) -> str:
        self._server = TestServer(self.app(), host="127.0.0.1")
        await self._server.start_server()
        self.url = str(self._server.make_url("")).rstrip("/")
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.close()

    @property
    def generate_calls(self) -> list[dict[str, Any]]:
        return [body for path, body, _ in self.calls if path.startswith("/v1/")]

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls.append((request.path, body, dict(request.headers)))
        if self.statuses:
            status = self.statuses.pop(0)
            error = {"message": f"scripted {status}", "type": "server_error", "param": None, "code": None}
            return web.json_response({"error": error}, status=status, headers={"Retry-After": "3"})
        if body.get("max_tokens") == 999:  # a request the worker itself refuses
            error = {
                "message": "max_tokens too large",
                "type": "invalid_request_error",
                "param": "max_tokens",
            }
            return web.json_response({"error": {**error, "code": None}}, status=400)
        chat = request.path.endswith("chat/completions")
        prompt = CHAT_PROMPT if chat else body["prompt"]
        if isinstance(prompt, str):
            prompt = [ord(c) for c in prompt]
        default = 8 if chat else 16
        count = body.get("max_tokens") or default
        ids = bool(body.get("return_token_ids"))
        shape = _Shape(
            chat, self.model, prompt, ids, bool((body.get("stream_options") or {}).get("include_usage"))
        )
        tokens = [token(len(prompt) + i) for i in range(count)]
        if not body.get("stream"):
            return web.json_response(shape.whole(tokens))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in shape.opening():
            await response.write(chunk)
        finished = False
        try:
            for i, (tid, text) in enumerate(tokens):
                if self.die_after is not None and i == self.die_after:
                    assert request.transport is not None
                    request.transport.close()  # the process died: no error event, no [DONE]
                    finished = True
                    return response
                if self.error_after is not None and i == self.error_after:
                    await response.write(frame({"error": {"message": "engine died", "code": "engine_dead"}}))
                    finished = True
                    return response
                await response.write(shape.delta(text, tid))
                self.streaming.set()
                await asyncio.sleep(self.delay)
            for chunk in shape.closing(len(tokens)):
                await response.write(chunk)
            await response.write(b"data: [DONE]\n\n")
            finished = True
            return response
        except ConnectionResetError:
            return response
        finally:
            if not finished:  # the client left: a failed write, or the handler cancelled
                self.aborted.set()


class _Shape:
    def __init__(self, chat: bool, model: str, prompt: list[int], ids: bool, usage: bool) -> None:
        self.chat, self.model, self.prompt, self.ids, self.usage = chat, model, prompt, ids, usage
        self.id = "chatcmpl-fake" if chat else "cmpl-fake"
        self.first = True

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": 7,
            "model": self.model,
            "choices": choices,
        }
        if self.usage:
            body["usage"] = None
        return body

    def _choice(self, text: str, tid: int | None, reason: str | None) -> dict[str, Any]:
        if self.chat:
            delta = {} if reason else {"content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        if self.ids:
            choice["token_ids"] = [] if tid is None else [tid]
            if self.first and not self.chat:
                choice["prompt_token_ids"] = self.prompt
        self.first = False
        return choice

    def opening(self) -> list[bytes]:
        if not self.chat:
            return []
        body = self._envelope(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )
        if self.ids:
            body["prompt_token_ids"] = self.prompt
            body["choices"][0]["token_ids"] = []
        self.first = False
        return [frame(body)]

    def delta(self, text: str, tid: int) -> bytes:
        return frame(self._envelope([self._choice(text, tid, None)]))

    def closing(self, n: int) -> list[bytes]:
        frames = [frame(self._envelope([self._choice("", None, "length")]))]
        if self.usage:
            usage = {
                "prompt_tokens": len(self.prompt),
                "completion_tokens": n,
                "total_tokens": len(self.prompt) + n,
            }
            frames.append(frame({**self._envelope([]), "usage": usage}))
        return frames

    def whole(self, tokens: list[tuple[int, str]]) -> dict[str, Any]:
        text = "".join(t for _, t in tokens)
        obj = "chat.completion" if self.chat else "text_completion"
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        usage = {"prompt_tokens": len(self.prompt), "completion_tokens": len(tokens)}
        return {
            "id": self.id,
            "object": obj,
            "created": 7,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        }


@asynccontextmanager
async def fakes(n: int, model: str = "fake") -> AsyncIterator[list[FakeOpenAI]]:
    servers = [FakeOpenAI(model) for _ in range(n)]
    for server in servers:
        await server.start()
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


def expected_text(prompt_len: int, count: int) -> str:
    return "".join(token(prompt_len + i)[1] for i in range(count))


class RouterClient:
    """An aiohttp session on a router served on loopback (relative URLs), and the router itself."""

    def __init__(self, session: aiohttp.ClientSession, server: RouterServer) -> None:
        self.session = session
        self.server = server
        self.router = server.router

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)  # post, get, put, request…


@asynccontextmanager
async def serving(router: Router) -> AsyncIterator[RouterClient]:
    """`router` behind its HTTP server on a free loopback port, with a client for it."""
    async with RouterServer(router) as server, aiohttp.ClientSession(base_url=server.url) as session:
        yield RouterClient(session, server)
