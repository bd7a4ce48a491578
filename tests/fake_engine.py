"""A deterministic stand-in for AsyncEngine, to test the HTTP layer without a model.

It answers every prompt with the same reply, one byte-token per output, honours max_tokens and
ignore_eos, ignores stop strings, and records what it was asked and which requests were closed early.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from microserve.engine.errors import EngineDead, EngineOverloaded, PromptTooLong
from microserve.engine.kv_storage import KVLayout
from microserve.engine.outputs import FinishReason, RequestOutput
from microserve.engine.sampling import SamplingParams

BOS, EOS, OFFSET = 1, 2, 3


class FakeTokenizer:
    """Byte-level: token id = byte + 3; ids 1 and 2 are BOS and EOS."""

    eos_token_id = EOS
    vocab_size = 256 + OFFSET

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [BOS] * add_special_tokens + [b + OFFSET for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        parts = []
        for i, message in enumerate(messages):
            if not isinstance(message.get("content"), str):
                raise ValueError(f"message {i} has no text content")
            parts.append(f"<{message['role']}>{message['content']}</s>")
        return "<s>" + "".join(parts) + ("<assistant>" if add_generation_prompt else "")


class FakeEngine:
    def __init__(
        self, *, reply: str = "Hello, world!", max_model_len: int = 64, model_name: str = "fake-model"
    ) -> None:
        self.model_name = model_name
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.kv_layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, block_size=16, dtype="float32")
        self.reply_ids = self.tokenizer.encode(reply, add_special_tokens=False)
        self.ready = True
        self.overloaded = False
        self.fail_after: int | None = None  # raise EngineDead after this many tokens
        self.token_delay = 0.0
        self.cached_tokens = 0
        self.waiting = 0
        self.running = 0
        self.calls: list[tuple[str, list[int], SamplingParams]] = []
        self.closed_ids: list[str] = []
        self.started = asyncio.Event()  # a request emitted its first output
        self.closed = asyncio.Event()  # a request's generator was closed before it finished
        self._queries = 0
        self._hits = 0

    def is_ready(self) -> bool:
        return self.ready

    def load(self) -> dict[str, Any]:
        return {
            "waiting": self.waiting,
            "running": self.running,
            "kv_usage": 0.25,
            "kv_blocks_free": 96,
            "kv_blocks_total": 128,
            "block_size": 16,
            "prefix_hit_rate": self._hits / self._queries if self._queries else 0.0,
            "prefix_cache_queries": self._queries,
            "prefix_cache_hits": self._hits,
        }

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, begin: int | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        if self.overloaded:
            raise EngineOverloaded("the waiting queue is full")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens, "
                f"but the prompt has {len(prompt_ids)} tokens"
            )
        if any(t >= self.tokenizer.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {self.tokenizer.vocab_size})")
        self.calls.append((request_id, list(prompt_ids), params))
        self._queries += len(prompt_ids)
        self._hits += self.cached_tokens
        self.running += 1
        finished = False
        try:
            for n in range(1, params.max_tokens + 1):
                if self.fail_after is not None and n > self.fail_after:
                    raise EngineDead("the engine loop crashed")
                i = n - 1
                if not params.ignore_eos and i == len(self.reply_ids):
                    token, reason = EOS, FinishReason.STOP
                else:
                    token, reason = self.reply_ids[i % len(self.reply_ids)], None
                if reason is None and n == params.max_tokens:
                    reason = FinishReason.LENGTH
                finished = reason is not None
                yield RequestOutput(
                    request_id=request_id,
                    token_ids=[token],
                    text=self.tokenizer.decode([token]),
                    finished=finished,
                    finish_reason=reason,
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=n,
                    cached_tokens=self.cached_tokens,
                )
                self.started.set()
                if finished:
                    return
                await asyncio.sleep(self.token_delay)
        finally:
            self.running -= 1
            if not finished:
                self.closed_ids.append(request_id)
                self.closed.set()
