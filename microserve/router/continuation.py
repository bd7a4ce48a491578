"""Mid-stream continuation: track what a microserve stream has delivered (text and token ids), and when
its engine dies, re-issue prompt + generated ids to another engine and reshape that stream as the client's.

Exact for greedy decoding and for the sim backend (its tokens depend only on the sequence); seeded or
random sampling restarts its random stream on the new engine, so the rest differs from what the dead
engine would have said (it is still a valid sample).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from microserve.api.shapes import SYSTEM_FINGERPRINT, chat_logprobs_from_completion
from microserve.api.sse import DONE_FRAME
from microserve.api.structured import STRUCTURED_FIELDS
from microserve.api.tool_calls import tool_choice_schema
from microserve.router.request import Route, RoutedRequest

# The sampling fields a continuation carries over; min_tokens and max_tokens are reduced by what was sent.
_CARRIED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "include_stop_str_in_output",
    "skip_special_tokens",
    # Structured output: a continuation's engine rebuilds the grammar's state from the tokens already
    # streamed (the prompt's last prior_output_tokens), so the rest of the answer still matches.
    *STRUCTURED_FIELDS,
)
# Carried to a strategy's first engine call (start_generate), not to a continuation: they concern the
# prompt, or several choices (each choice of an n > 1 stream continues as a request of its own).
_FIRST_ONLY = ("n", "prompt_logprobs")


class UpstreamStreamError(Exception):
    """The worker sent an SSE error event: its generation failed after the response started."""

    def __init__(self, error: Any) -> None:
        message = error.get("message") if isinstance(error, dict) else str(error)
        super().__init__(message or "the worker's stream failed")
        self.error = error


@dataclass(slots=True)
class StreamProgress:
    """What one client stream has been sent so far, enough to continue it on another engine."""

    route: Route
    keep_ids: bool  # the client asked for return_token_ids itself: leave the fields in
    include_usage: bool
    id: str | None = None
    created: int | None = None
    model: str | None = None
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    delivered: int = 0  # generated ids whose text has reached the client in full
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage_sent: bool = False
    done: bool = False
    continuations: int = 0
    cached_tokens: int | None = None  # from the engine's usage chunk, when the stream carried one
    skip: int = 0  # characters of the continuation the client already has

    opened: bool = False  # the client has had a first chunk (for chat: the one with the role)
    choices: int = 1  # n: the chat opening has a role chunk for each
    # Several choices (n > 1, a batch of prompts): one part per choice tracks it; a part continues as
    # a single-choice request and its frames go out under the choice's index, without [DONE].
    parts: list[StreamProgress] = field(default_factory=list)
    index: int = 0  # a part's choice index in the client's stream
    n: int = 1  # choices per prompt (a batch's prompt p has parts p * n to p * n + n - 1)
    is_part: bool = False
    prompt: Any = None  # a part's prompt as the client gave it: where it starts if nothing came yet
    started: bool = False  # the client has had a chunk of this choice

    @classmethod
    def for_request(cls, req: RoutedRequest, prompt_ids: list[int] | None = None) -> StreamProgress:
        """A fresh stream for `req`; give `prompt_ids` when a strategy sends them itself (PD)."""
        options = req.body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        progress = cls(
            route=req.route,
            keep_ids=req.wants_token_ids,
            include_usage=include_usage,
            prompt_ids=prompt_ids,
            choices=req.choices,
            n=max(1, int(req.body.get("n") or 1)),
        )
        if req.choices > 1:
            batched = req.route is Route.COMPLETIONS and req.batched
            prompts = req.body.get("prompt") if batched else [req.body.get("prompt")]
            progress.parts = [
                cls(
                    route=req.route,
                    keep_ids=req.wants_token_ids,
                    include_usage=False,
                    prompt_ids=None if batched else prompt_ids,
                    index=i,
                    is_part=True,
                    opened=True,
                    prompt=prompts[i // progress.n] if isinstance(prompts, list) else None,
                )
                for i in range(req.choices)
            ]
        return progress

    @property
    def resumable(self) -> bool:
        if self.parts:
            return self.id is not None and all(p.can_start() for p in self.unfinished())
        return self.id is not None and self.prompt_ids is not None

    def can_start(self) -> bool:
        """A part can continue: its prompt ids are known, or nothing came yet and it starts over."""
        if self.prompt_ids is not None:
            return True
        return self.route is Route.COMPLETIONS and not self.generated and self.prompt is not None

    def unfinished(self) -> list[StreamProgress]:
        """The parts (choices) whose finish the client has not had yet."""
        return [p for p in self.parts if p.finish_reason is None]

    @property
    def completion_tokens(self) -> int:
        return sum(len(p.generated) for p in self.parts) if self.parts else len(self.generated)

    def part_for_resume(self, part: StreamProgress) -> StreamProgress:
        """`part` ready to continue: it answers under the stream's id."""
        part.id, part.created, part.model = self.id, self.created, self.model
        return part

    def _decode(self, frame: bytes) -> dict[str, Any] | bytes | None:
        """A data frame's JSON chunk; DONE_FRAME for [DONE] (the stream is then done); None for any other
        SSE field. An error event raises UpstreamStreamError."""
        if not frame.startswith(b"data:"):
            return None
        payload = frame[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return DONE_FRAME
        chunk: dict[str, Any] = orjson.loads(payload)
        if "error" in chunk:
            raise UpstreamStreamError(chunk["error"])
        return chunk

    def track(self, frame: bytes) -> bytes | None:
        """Record one upstream SSE frame (without its blank line) and return it as the client gets it."""
        chunk = self._decode(frame)
        if chunk is None:
            return frame + b"\n\n"  # comments and other SSE fields pass untouched
        if isinstance(chunk, bytes):
            return chunk
        if self.id is None:
            self.id, self.created, self.model = chunk.get("id"), chunk.get("created"), chunk.get("model")
        self.opened = True
        strip = not self.keep_ids
        ids = chunk.pop("prompt_token_ids", None) if strip else chunk.get("prompt_token_ids")
        if ids is not None:
            self.prompt_ids = ids
            for part in self.parts:  # chat: one prompt for every choice
                part.prompt_ids = ids
        choices = chunk.get("choices")
        if choices:
            empty = True
            for choice in choices:
                empty = self._track_choice(choice, strip) and empty
            if empty:
                return None  # only there for the ids the router asked for: the client gets no empty delta
        elif chunk.get("usage"):
            self.usage_sent = True
            self.cached_tokens = _cached(chunk["usage"])
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _track_choice(self, choice: dict[str, Any], strip: bool) -> bool:
        """Record one choice of a chunk in its part; True if it carries nothing for the client."""
        target = self
        if self.parts:
            index = int(choice.get("index") or 0)
            if index >= len(self.parts):
                return False
            target = self.parts[index]
        ids = choice.pop("prompt_token_ids", None) if strip else choice.get("prompt_token_ids")
        if ids is not None:
            target.prompt_ids = ids
        new = choice.pop("token_ids", None) if strip else choice.get("token_ids")
        delta = choice.get("delta") or {}
        if "role" not in delta:  # chat's opening chunk is not the choice's first
            target.started = True
        text = choice.get("text") if self.route is Route.COMPLETIONS else delta.get("content")
        reason = choice.get("finish_reason")
        target._advance(new or [], text or "", reason)
        if delta.get("tool_calls"):  # the engine read a call from the text: that text is delivered
            target.delivered = len(target.generated)
            return False
        return strip and not text and reason is None and not choice.get("logprobs") and "role" not in delta

    def _advance(self, new_ids: list[int], text: str, finish_reason: str | None) -> None:
        self.generated.extend(new_ids)
        if text:
            # Text comes out only once every id so far is decoded (the engine holds back half characters).
            self.text.append(text)
            self.delivered = len(self.generated)
        if finish_reason is not None:
            self.finish_reason = finish_reason

    # -- continuing ---------------------------------------------------------------------------------

    def resume_body(
        self, req: RoutedRequest, decode: Callable[[list[int]], str] | None = None
    ) -> dict[str, Any] | None:
        """The /v1/completions body that continues this stream, or None if nothing is left to generate.

        It restarts from the ids whose text the client has in full; ids after those (half a character
        the engine held back) are generated again. With multi-character stop strings the engine also
        holds back text that might start one: with `decode` (the model's tokenizer) the restart point
        is the last id boundary inside the text the client has, and the overlap is skipped; without it,
        that held-back text (shorter than the longest stop string) is lost.
        """
        k = self.delivered
        self.skip = 0
        if decode is not None and holds_back(req):
            k, self.skip = _boundary(self.generated, "".join(self.text), decode)
        prompt = self.prompt if self.prompt_ids is None else self.prompt_ids + self.generated[:k]
        assert prompt is not None
        body: dict[str, Any] = {
            "prompt": prompt,
            "stream": True,
            "return_token_ids": True,
        }
        body.update(sampling_fields(req, first=False))
        # The penalties count the tokens generated before as output, as the first engine did.
        body["prior_output_tokens"] = k + int(req.body.get("prior_output_tokens") or 0)
        if req.body.get("min_tokens"):
            body["min_tokens"] = max(0, req.body["min_tokens"] - k)
        max_tokens = req.max_tokens
        if max_tokens is not None:
            if max_tokens - k <= 0:
                return None
            body["max_tokens"] = max_tokens - k
        else:
            body["max_tokens"] = None  # the rest of the context, as the client asked
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if self.is_part and req.choices > 1:
            body.pop("stream_options", None)  # the stream's one usage chunk is the router's
            body["choice_index"] = self.index % max(1, int(req.body.get("n") or 1))
            if not self.started and req.body.get("prompt_logprobs") is not None:
                body["prompt_logprobs"] = req.body["prompt_logprobs"]  # its first chunk is still to come
        # What follows replaces whatever the dead engine generated past the resume point.
        del self.generated[k:]
        return body

    def count_into(self, req: RoutedRequest) -> None:
        """Give the request the token counts this stream saw (the router's TPOT and /dashboard)."""
        req.output_tokens = self.completion_tokens
        if self.cached_tokens is not None:
            req.cached_tokens = self.cached_tokens

    def closing_frames(self) -> Iterator[bytes]:
        """What the client still needs when the generation had ended but the stream had not."""
        if self.finish_reason is None:
            self.finish_reason = "length"
            yield self._client_frame("", [], "length", self.index)
        if self.is_part:
            return
        yield from self.ending_frames()

    def ending_frames(self) -> Iterator[bytes]:
        """The usage chunk (if asked and not sent yet) and [DONE]."""
        if self.include_usage and not self.usage_sent:
            self.usage_sent = True
            yield self._usage_frame(self.completion_tokens, self.cached_tokens or 0)
        self.done = True
        yield DONE_FRAME

    def reshape(self, frame: bytes) -> bytes | None:
        """One frame of the continuation (a text_completion stream) as a frame of the client's stream."""
        chunk = self._decode(frame)
        if chunk is None or isinstance(chunk, bytes):
            return None if self.is_part else chunk  # a part's [DONE] is not the stream's
        opening = b""
        if not self.opened:  # a strategy's first stream, not a continuation: the client sees it start
            self._adopt(chunk)
            opening = self._opening_frame()
        choices = chunk.get("choices")
        if not choices:
            usage = chunk.get("usage")
            if not usage or not self.include_usage:
                return None
            self.usage_sent = True
            self.cached_tokens = cached = _cached(usage)
            return opening + self._usage_frame(self.completion_tokens, cached)
        choice = choices[0]
        ids = choice.get("token_ids") or []
        text = choice.get("text") or ""
        reason = choice.get("finish_reason")
        logprobs = choice.get("logprobs")
        if self.skip and text:
            cut = min(self.skip, len(text))
            self.skip -= cut
            self.generated.extend(ids)  # ids of text the client already has: count them, send nothing new
            ids, text, logprobs = [], text[cut:], None
        index = int(choice.get("index") or 0)
        prompt_logprobs = choice.get("prompt_logprobs")
        if self.is_part:
            index = self.index
            if self.prompt_ids is None:
                self.prompt_ids = choice.get("prompt_token_ids")
            self._advance(ids, text, reason)
        elif self.parts:  # a strategy's own stream of several choices
            if index < len(self.parts):
                self.parts[index]._advance(ids, text, reason)
        elif index == 0:
            self._advance(ids, text, reason)
        if (
            not text
            and reason is None
            and not (self.keep_ids and ids)
            and not logprobs
            and not prompt_logprobs
        ):
            return opening or None
        frame = self._client_frame(
            text, ids, reason, index, logprobs, choice.get("stop_reason"), prompt_logprobs
        )
        return opening + frame

    def _adopt(self, chunk: dict[str, Any]) -> None:
        upstream_id = str(chunk.get("id") or uuid.uuid4().hex)
        if self.route is Route.CHAT:  # the client asked for a chat answer: give it a chat id
            upstream_id = "chatcmpl-" + upstream_id.removeprefix("cmpl-")
        self.id = upstream_id
        self.created = chunk.get("created") or int(time.time())
        self.model = chunk.get("model")
        self.opened = True
        if self.prompt_ids is None and chunk.get("choices"):
            self.prompt_ids = chunk["choices"][0].get("prompt_token_ids")

    def _opening_frame(self) -> bytes:
        if self.route is not Route.CHAT:
            return b""
        frames = []
        for index in range(self.choices):
            choice: dict[str, Any] = {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
                "stop_reason": None,
            }
            body: dict[str, Any] = {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": [choice],
            }
            if self.keep_ids:
                if index == 0:
                    body["prompt_token_ids"] = self.prompt_ids
                choice["token_ids"] = []
            if self.include_usage:
                body["usage"] = None
            frames.append(b"data: " + orjson.dumps(body) + b"\n\n")
        return b"".join(frames)

    def _client_frame(
        self,
        text: str,
        ids: list[int],
        reason: str | None,
        index: int = 0,
        logprobs: dict[str, Any] | None = None,
        stop_reason: str | int | None = None,
        prompt_logprobs: list[Any] | None = None,
    ) -> bytes:
        if self.route is Route.CHAT:
            delta = {"content": text} if text or reason is None else {}
            chat_lp = chat_logprobs_from_completion(logprobs) if logprobs else None
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": chat_lp}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs}
            obj = "text_completion"
        choice["finish_reason"] = reason
        choice["stop_reason"] = stop_reason
        if prompt_logprobs is not None:  # vLLM's, in the first chunk of each choice
            choice["prompt_logprobs"] = prompt_logprobs
        if self.keep_ids:
            choice["token_ids"] = ids
        body: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [choice],
        }
        if self.include_usage:
            body["usage"] = None
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def _usage_frame(self, completion_tokens: int, cached: int) -> bytes:
        if self.prompt_ids is not None or not self.parts:
            prompt_tokens = len(self.prompt_ids or [])
        else:  # each prompt once (a batch's, or the one of n choices)
            prompt_tokens = sum(len(p.prompt_ids or []) for p in self.parts[:: self.n])
        obj = "chat.completion.chunk" if self.route is Route.CHAT else "text_completion"
        body: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": min(cached, prompt_tokens)},
            },
        }
        return b"data: " + orjson.dumps(body) + b"\n\n"


def _cached(usage: dict[str, Any]) -> int:
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def sampling_fields(req: RoutedRequest, first: bool = True) -> dict[str, Any]:
    """The client's model and sampling fields, for a completion request a strategy sends on its behalf
    (`first`) or that continues a stream; for a stream also its `stream_options`, so that the usage
    chunk it asked for comes back. Chat's logprobs become the completions' form."""
    names = _CARRIED + _FIRST_ONLY if first else _CARRIED
    fields = {name: req.body[name] for name in names if req.body.get(name) is not None}
    if req.route is Route.CHAT:
        if req.body.get("logprobs"):
            fields["logprobs"] = req.body.get("top_logprobs") or 0
        # a forced tool_choice: the engine decodes the completion under the schema of the calls
        tools, parallel = req.body.get("tools") or [], req.body.get("parallel_tool_calls") is not False
        schema = tool_choice_schema(tools, req.body.get("tool_choice"), parallel)
        if schema is not None:
            fields["structured_outputs"] = {"json": schema}
    elif req.body.get("logprobs") is not None:
        fields["logprobs"] = req.body["logprobs"]
    if first and req.route is Route.COMPLETIONS and req.body.get("echo"):
        fields["echo"] = True
    if req.stream and req.body.get("stream_options") is not None:
        fields["stream_options"] = req.body["stream_options"]
    if req.model is not None:
        fields["model"] = req.model
    if req.max_tokens is not None:  # max_tokens or, for chat, max_completion_tokens
        fields["max_tokens"] = req.max_tokens
    if req.body.get("min_tokens") is not None:
        fields["min_tokens"] = req.body["min_tokens"]
    if req.priority is not None:  # sent to microserve engines only, as these requests are
        fields["priority"] = req.priority
    return fields


def whole_as_client(req: RoutedRequest, data: bytes) -> bytes:
    """A whole text_completion answer in the client's shape: a chat.completion for a chat request."""
    body = orjson.loads(data)
    choices = body.get("choices") or []
    if not req.wants_token_ids:
        body.pop("prompt_token_ids", None)
        for choice in choices:
            choice.pop("prompt_token_ids", None)
            choice.pop("token_ids", None)
    if req.route is Route.CHAT and body.get("object") == "text_completion":
        body["id"] = "chatcmpl-" + str(body.get("id", "")).removeprefix("cmpl-")
        body["object"] = "chat.completion"
        for choice in choices:
            choice["message"] = {"role": "assistant", "content": choice.pop("text", "")}
            prompt_ids = choice.pop("prompt_token_ids", None)
            if prompt_ids is not None:  # chat has them at the top
                body["prompt_token_ids"] = prompt_ids
            prompt_logprobs = choice.pop("prompt_logprobs", None)
            if prompt_logprobs is not None:  # so has vLLM's chat its prompt_logprobs
                body["prompt_logprobs"] = prompt_logprobs
            if choice.get("logprobs"):
                choice["logprobs"] = chat_logprobs_from_completion(choice["logprobs"])
    return orjson.dumps(body)


def holds_back(req: RoutedRequest) -> bool:
    """Does the engine hold text back for this request (to match a multi-character stop string)?"""
    stop = req.body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    return any(isinstance(s, str) and len(s) > 1 for s in stops)


def _boundary(generated: list[int], sent: str, decode: Callable[[list[int]], str]) -> tuple[int, int]:
    """The most ids whose decoded text is a prefix of `sent`, and how many characters of `sent` follow."""
    for k in range(len(generated), -1, -1):
        text = decode(generated[:k])
        if sent.startswith(text) and not text.endswith("\ufffd"):
            return k, len(sent) - len(text)
    return 0, len(sent)


def split_frames(buffer: bytearray, data: bytes) -> list[bytes]:
    """Append `data` and take every complete SSE frame out of `buffer` (blank-line separated)."""
    buffer += data
    if b"\r" in data:  # some servers end lines with CRLF
        buffer[:] = buffer.replace(b"\r\n", b"\n")
    frames = []
    start = 0
    while (end := buffer.find(b"\n\n", start)) >= 0:
        frames.append(bytes(buffer[start:end]))
        start = end + 2
    del buffer[:start]
    return frames
