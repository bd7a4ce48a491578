"""`EngineClient`: the async client of one engine's HTTP API — OpenAI calls, /load, and the microserving
verbs — used by the router, the benchmarks and the tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from microserve.http.client import ClientError, HTTPClient

CONNECT_TIMEOUT_S = 5.0


class EngineError(Exception):
    """The engine answered an error: `status` and the OpenAI-shaped error message."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.code = code


@dataclass(slots=True, frozen=True)
class KVAddress:
    """Where a receiver expects a request's KV: returned by prep_recv, passed on to remote_send."""

    info: dict[str, Any]
    matched: int


class EngineClient:
    def __init__(
        self,
        url: str,
        http: HTTPClient | None = None,
        internal_token: str | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """`headers` go with every call (the router's trace context, for one request's verbs);
        `timeout_s` bounds each call (none by default). Without `http`, the client makes its own."""
        self.url = url.rstrip("/")
        self._http = http
        self._own_http = http is None
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {internal_token}"} if internal_token else {}
        if headers:
            self._headers.update(headers)

    @property
    def http(self) -> HTTPClient:
        if self._http is None:
            self._http = HTTPClient()
        return self._http

    async def close(self) -> None:
        if self._own_http and self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        status, data = await self.http.post_json(
            self.url, path, body, headers=self._headers, timeout_s=self.timeout_s,
            connect_timeout_s=CONNECT_TIMEOUT_S,
        )  # fmt: skip
        if status != 200:
            raise _error(status, data)
        return orjson.loads(data)

    async def _get(self, path: str) -> Any:
        status, data = await self.http.fetch(
            "GET", self.url, path, headers=self._headers, timeout_s=self.timeout_s,
            connect_timeout_s=CONNECT_TIMEOUT_S,
        )  # fmt: skip
        if status != 200:
            raise _error(status, data)
        return orjson.loads(data)

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST with stream=true and yield each SSE data chunk; an error event raises EngineError."""
        r = await self.http.request(
            "POST",
            self.url,
            path,
            body=orjson.dumps({**body, "stream": True}),
            headers={**self._headers, "Content-Type": "application/json"},
            timeout_s=self.timeout_s,
            connect_timeout_s=CONNECT_TIMEOUT_S,
        )
        try:
            if r.status != 200:
                raise _error(r.status, await r.read())
            done = False
            async for line in r.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                chunk = orjson.loads(payload)
                if "error" in chunk:
                    err = chunk["error"]
                    raise EngineError(500, err.get("message", "stream failed"), err.get("code"))
                yield chunk
            if not done:
                raise EngineError(502, "the stream ended without [DONE]")
        finally:
            r.close()

    # -- OpenAI calls and load --------------------------------------------------------------------

    async def completions(self, **body: Any) -> dict[str, Any]:
        return await self._post("/v1/completions", body)

    async def chat(self, **body: Any) -> dict[str, Any]:
        return await self._post("/v1/chat/completions", body)

    def stream_completions(self, **body: Any) -> AsyncIterator[dict[str, Any]]:
        return self._stream("/v1/completions", body)

    def stream_chat(self, **body: Any) -> AsyncIterator[dict[str, Any]]:
        return self._stream("/v1/chat/completions", body)

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._get("/v1/models"))["data"]]

    async def load(self) -> dict[str, Any]:
        return await self._get("/load")

    async def ready(self) -> bool:
        try:
            status, _ = await self.http.fetch(
                "GET", self.url, "/ready", timeout_s=self.timeout_s, connect_timeout_s=CONNECT_TIMEOUT_S
            )
        except (ClientError, TimeoutError):
            return False
        return status == 200

    # -- microserving verbs -----------------------------------------------------------------------

    async def prep_recv(self, request_id: str, prompt: str | list[int], end: int | None = None) -> KVAddress:
        """Reserve blocks here for prompt[matched:end]; returns where to send and what is held already."""
        r = await self._post(
            "/microserving/prep_recv", {"request_id": request_id, "prompt": prompt, "end": end}
        )
        return KVAddress(r["kv_addr_info"], r["matched_len"])

    async def remote_send(
        self,
        request_id: str,
        prompt: str | list[int],
        addr: KVAddress,
        dst: EngineClient | str,
        begin: int = 0,
        end: int | None = None,
    ) -> dict[str, int]:
        """Compute prompt[:end]'s KV here and push prompt[begin:end] to `dst`; returns sent_tokens, bytes."""
        dst_url = dst.url if isinstance(dst, EngineClient) else dst
        body = {
            "request_id": request_id,
            "prompt": prompt,
            "begin": begin,
            "end": end,
            "kv_addr_info": addr.info,
            "dst_url": dst_url,
        }
        return await self._post("/microserving/remote_send", body)

    async def start_generate(
        self, request_id: str, prompt: str | list[int], begin: int, **sampling: Any
    ) -> dict[str, Any]:
        """Generate on top of the KV received for `request_id` (a completion response)."""
        body = {"request_id": request_id, "prompt": prompt, "begin": begin, **sampling}
        return await self._post("/microserving/start_generate", body)

    def stream_start_generate(
        self, request_id: str, prompt: str | list[int], begin: int, **sampling: Any
    ) -> AsyncIterator[dict[str, Any]]:
        body = {"request_id": request_id, "prompt": prompt, "begin": begin, **sampling}
        return self._stream("/microserving/start_generate", body)

    async def release(self, request_id: str) -> bool:
        return (await self._post("/microserving/release", {"request_id": request_id}))["released"]

    async def hot_prefixes(self, max_tokens: int = 8192, limit: int = 32) -> list[list[int]]:
        """The engine's hottest cached prefixes (token ids), hottest first, up to `max_tokens` in all."""
        r = await self._post("/microserving/prefixes", {"max_tokens": max_tokens, "limit": limit})
        return [p["prompt"] for p in r["prefixes"]]


def _error(status: int, data: bytes) -> EngineError:
    try:
        err = orjson.loads(data)["error"]
        return EngineError(status, err.get("message", ""), err.get("code"))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return EngineError(status, data.decode(errors="replace")[:500])
