"""One streamed benchmark request to an OpenAI-compatible server, timed chunk by chunk.

It records when the request went out, when each chunk carrying generated text arrived, the token counts
from the usage report (or the chunk count where a server sends none), and any error as one line."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from microserve.bench.workloads import BenchRequest, Endpoint


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to send: the server, its API flavour, and what to ask for."""

    base_url: str
    model: str
    endpoint: Endpoint = Endpoint.CHAT
    # vLLM's `ignore_eos` makes every answer exactly max_tokens long, so the offered load is the asked one;
    # servers that reject unknown fields need it off.
    ignore_eos: bool = True
    api_key: str | None = None
    request_timeout_s: float = 600.0

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint.path

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def body(self, request: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            **request.api_input(self.endpoint),
            "max_tokens": request.expected_output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body


@dataclass(slots=True)
class RequestRecord:
    """What one request did. Times are `time.perf_counter()` seconds; derived latencies are in seconds."""

    request: BenchRequest
    arrival: float = 0.0  # when the arrival process released it (it may then wait for a concurrency slot)
    start: float = 0.0  # when it was sent
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with generated text
    prompt_len: int = 0
    output_tokens: int = 0
    usage_reported: bool = False
    text: str = ""
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def latency(self) -> float:
        """End-to-end: from sending to the last chunk with generated text (not the usage chunk)."""
        return self.chunk_times[-1] - self.start

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive chunks; a chunk carrying several tokens is one gap, as in vLLM."""
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def queue_time(self) -> float:
        return self.start - self.arrival


def _generated_text(event: dict[str, Any]) -> str | None:
    """The generated text a chunk carries, or None for chunks that carry none.

    Role-only openings and finish-only closings carry no token; counting them would put a zero gap into
    ITL and move TTFT before any token exists. A chunk with token ids but no text (a token whose text the
    detokenizer holds back) is a token.
    """
    choices = event.get("choices")
    if not choices:
        return None
    choice = choices[0]
    if "text" in choice:
        text = choice.get("text") or ""
    else:
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("reasoning_content") or ""
    if text or choice.get("token_ids"):
        return text
    return None


def _error_message(status: int, body: bytes) -> str:
    try:
        message = orjson.loads(body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = body.decode(errors="replace").strip()[:200] or "no body"
    return f"HTTP {status}: {message}"


async def send(session: aiohttp.ClientSession, target: Target, record: RequestRecord) -> RequestRecord:
    """Send `record.request` streamed and fill in `record`; never raises for a failed request."""
    record.prompt_len = record.request.prompt_len or 0
    parts: list[str] = []
    done = False
    record.start = time.perf_counter()
    try:
        timeout = aiohttp.ClientTimeout(total=target.request_timeout_s)
        async with session.post(
            target.url,
            data=orjson.dumps(target.body(record.request)),
            headers=target.headers(),
            timeout=timeout,
        ) as resp:
            if resp.status != 200:
                record.error = _error_message(resp.status, await resp.read())
                return record
            async for raw in resp.content:
                now = time.perf_counter()
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators and ": keep-alive" comments
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                event = orjson.loads(data)
                if err := event.get("error"):
                    message = err.get("message", err) if isinstance(err, dict) else err
                    record.error = f"stream error: {message}"
                    break
                if (text := _generated_text(event)) is not None:
                    record.chunk_times.append(now)
                    parts.append(text)
                if usage := event.get("usage"):
                    record.usage_reported = True
                    record.output_tokens = int(usage.get("completion_tokens") or 0)
                    record.prompt_len = int(usage.get("prompt_tokens") or record.prompt_len)
    except TimeoutError:
        record.error = f"timeout after {target.request_timeout_s:g} s"
    except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a body that is not JSON
        record.error = f"{type(exc).__name__}: {exc}".strip()
    except (AttributeError, TypeError, KeyError, IndexError) as exc:
        # JSON of the wrong shape from a server that is not quite OpenAI-compatible: this request failed,
        # the run goes on.
        record.error = f"malformed stream chunk: {type(exc).__name__}: {exc}"
    record.text = "".join(parts)
    if record.error is None:
        if not done:
            record.error = "stream ended without [DONE]"
        elif not record.chunk_times:
            record.error = "no generated token arrived"
    if not record.usage_reported:
        record.output_tokens = len(record.chunk_times)
    return record


async def first_model(session: aiohttp.ClientSession, base_url: str, api_key: str | None = None) -> str:
    """The first model the server lists at /v1/models (what `--model` defaults to)."""
    url = base_url.rstrip("/") + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise ValueError(f"{url}: {_error_message(resp.status, body)}")
            models = orjson.loads(body).get("data") or []
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"cannot list models at {url}: {type(exc).__name__}: {exc}") from None
    if not models:
        raise ValueError(f"{url} lists no model; pass --model")
    return str(models[0]["id"])
