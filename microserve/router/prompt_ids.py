"""Prompt token ids in the router, for the strategies and policies that need them (and only for those).

The tokenizer of a served model loads once, from the same files the engine uses; chat prompts are
rendered with the model's template exactly as the engine renders them, so the ids match the engine's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from microserve.api.prompt import body_prompt_ids
from microserve.model.tokenizer import Tokenizer
from microserve.router.request import Route

log = logging.getLogger(__name__)


class TokenizerCache:
    """Served model name -> its tokenizer, loaded on first use (`sources` maps a name to a model path)."""

    def __init__(
        self,
        sources: Mapping[str, str] | None = None,
        context_of: Callable[[str], int | None] = lambda model: None,
    ) -> None:
        """`context_of(model)` is the model's max_model_len as its engines report it (None: not known)."""
        self._sources = dict(sources or {})
        self._context_of = context_of
        self._loaded: dict[str, Tokenizer] = {}
        self._lock = threading.Lock()  # preload runs in a thread; two loads of one model would waste seconds

    def get(self, model: str) -> Tokenizer:
        tokenizer = self._loaded.get(model)
        if tokenizer is not None:
            return tokenizer
        with self._lock:
            if model not in self._loaded:
                # The loader imports torch (a second of start-up); only a router that tokenizes pays it.
                from microserve.model.loader import resolve_model

                source = self._sources.get(model, model)
                try:
                    self._loaded[model] = Tokenizer.load(resolve_model(source))
                except (OSError, ValueError) as exc:
                    raise LookupError(f"no tokenizer for model {model!r} (from {source!r}): {exc}") from None
                log.info("router: loaded the tokenizer of %s", model)
            return self._loaded[model]

    async def preload(self, models: Iterable[str]) -> list[str]:
        """Load ahead of traffic, off the event loop; returns why each model that failed did."""
        missing = []
        for model in models:
            try:
                await asyncio.to_thread(self.get, model)
            except LookupError as exc:
                missing.append(str(exc))
        return missing

    def prompt_ids(self, model: str | None, route: Route, body: Mapping[str, Any]) -> list[int]:
        if model is None:
            raise LookupError("the request names no model, so no tokenizer can be chosen")
        return prompt_ids(self.get(model), route, body, self._context_of(model))


def prompt_ids(
    tokenizer: Tokenizer, route: Route, body: Mapping[str, Any], max_model_len: int | None = None
) -> list[int]:
    """The ids the engine computes for this body (`microserve.api.prompt`, shared with the engine).

    Tokenizing runs on the event loop (the strategies ask for ids synchronously), so a prompt longer
    than the context can hold in characters is refused before it is tokenized, with the engine's 400:
    what is tokenized here is bounded by max_model_len times the longest token's characters."""
    return body_prompt_ids(tokenizer, route is Route.CHAT, body, max_model_len)
