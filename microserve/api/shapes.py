"""OpenAI response shapes (plain dicts, serialized with orjson): whole answers and stream chunks for
/v1/completions and /v1/chat/completions, with n choices, logprobs, stop_reason and usage.

With `prompt_token_ids` set (the request asked for vLLM's `return_token_ids`), answers carry the
prompt's ids (completions: on each choice's first appearance; chat: at the top) and each choice the
`token_ids` new in it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from microserve.api.tool_calls import ChatToolCalls
from microserve.engine.outputs import TokenLogprobs

SYSTEM_FINGERPRINT = "microserve"

TokenText = Callable[[int], str]  # a token id's text, special tokens included


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def body(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(slots=True)
class Choice:
    """One choice of a whole answer, gathered from its outputs."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # vLLM's, when asked


def chat_logprobs(entries: list[TokenLogprobs], token_text: TokenText) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    return _chat_content(
        (token_text(e.token_id), _finite(e.logprob), [(token_text(t), _finite(lp)) for t, lp in e.top])
        for e in entries
    )


def _chat_content(tokens: Iterable[tuple[str, float, Iterable[tuple[str, float]]]]) -> dict[str, Any]:
    """Chat's `logprobs` from (text, logprob, top (text, logprob) pairs) per token."""
    return {
        "content": [
            {**_chat_token(text, lp), "top_logprobs": [_chat_token(t, tlp) for t, tlp in top]}
            for text, lp, top in tokens
        ]
    }


def _chat_token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def completion_logprobs(
    entries: list[TokenLogprobs | None], token_text: TokenText, offset: int = 0
) -> dict[str, Any]:
    """OpenAI's completions `logprobs`: parallel lists, text offsets counted from `offset`.

    An entry of None (the first prompt token, which nothing predicts) is a null logprob."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for e in entries:
        if e is None:
            continue
        text = token_text(e.token_id)
        tokens.append(text)
        token_logprobs.append(_finite(e.logprob))
        top_logprobs.append({token_text(t): _finite(lp) for t, lp in e.top} if e.top else None)
        text_offset.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def vllm_prompt_logprobs(entries: list[TokenLogprobs | None], token_text: TokenText) -> list[Any]:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first) its own and the top entries,
    `{token_id: {logprob, rank, decoded_token}}`."""
    out: list[Any] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        ranked = {e.token_id: (e.logprob, e.rank)}
        for rank, (t, lp) in enumerate(e.top, start=1):
            ranked.setdefault(t, (lp, rank))
        out.append(
            {
                str(t): {"logprob": _finite(lp), "rank": rank, "decoded_token": token_text(t)}
                for t, (lp, rank) in ranked.items()
            }
        )
    return out


def chat_logprobs_from_completion(logprobs: dict[str, Any]) -> dict[str, Any]:
    """A completions `logprobs` object in chat's form (the router answers a chat client from an engine's
    completion stream). Top entries whose texts collide were merged by the completions form already."""
    tops = logprobs.get("top_logprobs") or []
    texts = zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [], strict=False)
    return _chat_content(
        (text, lp, (tops[i] if i < len(tops) and tops[i] else {}).items())
        for i, (text, lp) in enumerate(texts)
    )


def _finite(logprob: float) -> float:
    # JSON has no -inf; vLLM reports -9999.0 for an impossible token.
    return max(logprob, -9999.0)


@dataclass(slots=True)
class _Shape:
    """What both routes' shapes share: the envelope, `usage: null` on chunks, the closing usage chunk."""

    CHUNK: ClassVar[str] = ""  # the chunks' `object`

    model: str
    include_usage: bool = False
    prompt_token_ids: list[int] | None = None
    token_text: TokenText | None = None  # set when the request asked for logprobs
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def return_token_ids(self) -> bool:
        return self.prompt_token_ids is not None

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }

    def _chunk_of(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = self._envelope(self.CHUNK, choices)
        if self.include_usage:
            # OpenAI puts `usage: null` on every chunk but the last when include_usage is on.
            body["usage"] = None
        return body

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        body = self._envelope(self.CHUNK, [])
        body["usage"] = usage.body()
        return body


@dataclass(slots=True)
class CompletionShape(_Shape):
    """The JSON shapes of one /v1/completions response, whole or as `text_completion` chunks."""

    CHUNK: ClassVar[str] = "text_completion"

    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    # A batch of prompts: each prompt's ids, for its n choices' prompt_token_ids (else prompt_token_ids).
    batch_prompt_ids: list[list[int]] | None = None
    n: int = 1
    _prompt_ids_sent: set[int] = field(default_factory=set)
    _offsets: dict[int, int] = field(default_factory=dict)  # text offset of each choice's next token

    def _logprobs(self, index: int, text: str, entries: list[TokenLogprobs] | None) -> dict[str, Any] | None:
        if entries is None or self.token_text is None:
            return None
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + len(text)
        return completion_logprobs(list(entries), self.token_text, offset)

    def _choice(
        self,
        index: int,
        text: str,
        token_ids: list[int],
        logprobs: list[TokenLogprobs] | None,
        reason: str | None = None,
        stop_reason: str | int | None = None,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": index,
            "text": text,
            "logprobs": self._logprobs(index, text, logprobs),
            "finish_reason": reason,
            "stop_reason": stop_reason,
        }
        if self.prompt_token_ids is not None:
            if index not in self._prompt_ids_sent:
                batch = self.batch_prompt_ids
                choice["prompt_token_ids"] = batch[index // self.n] if batch else self.prompt_token_ids
                self._prompt_ids_sent.add(index)
            choice["token_ids"] = token_ids
        return choice

    def full(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        body = self._envelope(
            self.CHUNK,
            [
                self._choice(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason)
                for c in choices
            ],
        )
        for c, choice in zip(choices, body["choices"], strict=True):
            if c.prompt_logprobs is not None and self.token_text is not None:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(c.prompt_logprobs, self.token_text)
        body["usage"] = usage.body()
        return body

    def opening_chunks(self, indices: range) -> list[dict[str, Any]]:
        return []

    def delta_chunk(
        self,
        index: int,
        text: str,
        token_ids: list[int] | None = None,
        logprobs: list[TokenLogprobs] | None = None,
    ) -> dict[str, Any]:
        return self._chunk_of([self._choice(index, text, token_ids or [], logprobs)])

    def finish_chunk(self, index: int, reason: str | None, stop_reason: str | int | None) -> dict[str, Any]:
        return self._chunk_of([self._choice(index, "", [], None, reason, stop_reason)])

    def rewrite(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        return [chunk]


@dataclass(slots=True)
class ChatShape(_Shape):
    """The JSON shapes of one /v1/chat/completions response, whole or as `chat.completion.chunk`s."""

    CHUNK: ClassVar[str] = "chat.completion.chunk"

    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    tool_calls: ChatToolCalls | None = None  # set when the answer is read for tool calls

    def _logprobs(self, entries: list[TokenLogprobs] | None) -> dict[str, Any] | None:
        if entries is None or self.token_text is None:
            return None
        return chat_logprobs(entries, self.token_text)

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any],
        token_ids: list[int],
        logprobs: list[TokenLogprobs] | None = None,
        reason: str | None = None,
        stop_reason: str | int | None = None,
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": self._logprobs(logprobs),
            "finish_reason": reason,
            "stop_reason": stop_reason,
        }
        if self.prompt_token_ids is not None:
            choice["token_ids"] = token_ids
        return self._chunk_of([choice])

    def full(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        out = []
        for c in choices:
            choice = {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            if self.prompt_token_ids is not None:
                choice["token_ids"] = c.token_ids
            out.append(choice)
        body = self._envelope("chat.completion", out)
        if self.prompt_token_ids is not None:
            body["prompt_token_ids"] = self.prompt_token_ids
        if choices and choices[0].prompt_logprobs is not None and self.token_text is not None:
            body["prompt_logprobs"] = vllm_prompt_logprobs(choices[0].prompt_logprobs, self.token_text)
        body["usage"] = usage.body()
        return body if self.tool_calls is None else self.tool_calls.whole(body)

    def opening_chunks(self, indices: range) -> list[dict[str, Any]]:
        chunks = [self._chunk(i, {"role": "assistant", "content": ""}, []) for i in indices]
        if self.prompt_token_ids is not None and chunks:
            chunks[0]["prompt_token_ids"] = self.prompt_token_ids
        return chunks

    def delta_chunk(
        self,
        index: int,
        text: str,
        token_ids: list[int] | None = None,
        logprobs: list[TokenLogprobs] | None = None,
    ) -> dict[str, Any]:
        return self._chunk(index, {"content": text}, token_ids or [], logprobs)

    def finish_chunk(self, index: int, reason: str | None, stop_reason: str | int | None) -> dict[str, Any]:
        return self._chunk(index, {}, [], None, reason, stop_reason)

    def rewrite(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks to send for `chunk`: itself, or its content read for tool calls."""
        return [chunk] if self.tool_calls is None else self.tool_calls.chunks(chunk)


ResponseShape = CompletionShape | ChatShape
