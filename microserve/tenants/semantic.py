"""The semantic cache: a deterministic request whose last message means what an earlier one of the same
tenant meant (cosine similarity of their embeddings at or above a threshold) gets that earlier answer.

Everything but the last message's text must match exactly (the namespace: tenant, route, model, the
conversation before it, sampling, `stream`): only the newest question is compared by meaning, so a long
shared system prompt cannot make different questions look alike, and a streamed request only ever
replays a stream. Answers live in the exact cache's store (its TTL and size bound); the index only maps
vectors to their keys, and an answer gone from the store is a miss.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson

from microserve.tenants.cache import CacheBackend, cache_key, cacheable, no_cache
from microserve.tenants.vector_index import MemoryIndex, RedisIndex, VectorIndex

log = logging.getLogger(__name__)

SEMANTIC_HIT = "semantic-hit"
# From benchmarks/semantic_cache.py on benchmarks/data/paraphrases.jsonl (docs/tenants.md): with the
# bundled model's own embeddings no threshold separates paraphrases from near misses ("capital of France"
# against "of Germany"); 0.99 keeps false hits near 5% of near misses and catches ~10% of paraphrases. A
# real embedding model (`--semantic-cache-model`) is what makes the cache worth turning on.
DEFAULT_THRESHOLD = 0.99
CHAT_ROUTE = "/v1/chat/completions"

# POST `body` to `path` on an engine of the body's model: (status, body) — `Router.forward_to_engine`.
Forward = Callable[[str, bytes], Awaitable[tuple[int, bytes]]]


class EmbeddingFailed(Exception):
    pass


def message_text(content: Any) -> str | None:
    """A message's text: a string, or text parts only (an image cannot be compared by its text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
        if all(isinstance(p, str) for p in parts):
            return "\n".join(parts)  # type: ignore[arg-type]
    return None


def split_request(route: str, body: Mapping[str, Any]) -> tuple[dict[str, Any], str] | None:
    """(the request without the text compared by meaning, that text), or None when it has none: the
    last message's content for a chat, a single text prompt for a completion."""
    if route == CHAT_ROUTE:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            return None
        last = messages[-1]
        text = message_text(last.get("content"))
        if not text:
            return None
        rest = [*messages[:-1], {k: v for k, v in last.items() if k != "content"}]
        return {**body, "messages": rest}, text
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        return None
    return {k: v for k, v in body.items() if k != "prompt"}, prompt


class Embedder(Protocol):
    def model_for(self, body: Mapping[str, Any]) -> str | None:
        """The model to embed a request's text with (None: the fleet's default)."""
        ...

    async def __call__(self, model: str | None, text: str) -> np.ndarray:
        """The text's unit vector; raises when there is none to be had."""
        ...


@dataclass(frozen=True, slots=True)
class EmbedStyle:
    """How a text is embedded: the prompt it is wrapped in, and the engine's pooling."""

    template: str
    pooling: str | None  # microserve's `pooling` field; None: not sent (any OpenAI-compatible server)


STYLES = {
    # PromptEOL (Jiang et al. 2023, "Scaling Sentence Embeddings with Large Language Models"): a causal
    # model's last hidden state after a prompt that asks for the text's meaning in one word. On the
    # bundled model it separates paraphrases from near misses far better than a mean over the text's
    # tokens, which mostly measures shared words (benchmarks/semantic_cache.py, docs/tenants.md).
    "prompt-last": EmbedStyle('This sentence : "{text}" means in one word:"', "last"),
    "mean": EmbedStyle("{text}", "mean"),
    # For a dedicated embedding model (`--semantic-cache-model`, e.g. on a vLLM worker): the text as is.
    "plain": EmbedStyle("{text}", None),
}
DEFAULT_STYLE = "prompt-last"


class FleetEmbedder:
    """Embeddings from the fleet's own /v1/embeddings: of the request's model, or of `model` when set
    (an embedding worker the fleet serves under that name)."""

    def __init__(self, forward: Forward, model: str | None = None, style: str = DEFAULT_STYLE) -> None:
        self.forward = forward
        self.model = model
        self.style = STYLES[style]

    def model_for(self, body: Mapping[str, Any]) -> str | None:
        requested = body.get("model")
        return self.model or (requested if isinstance(requested, str) else None)

    async def __call__(self, model: str | None, text: str) -> np.ndarray:
        request: dict[str, Any] = {
            "input": self.style.template.format(text=text),
            "encoding_format": "base64",
        }
        if self.style.pooling is not None:
            request["pooling"] = self.style.pooling
        if model is not None:
            request["model"] = model
        status, answer = await self.forward("/v1/embeddings", orjson.dumps(request))
        if status != 200:
            raise EmbeddingFailed(f"/v1/embeddings answered {status}: {answer[:200]!r}")
        encoded = orjson.loads(answer)["data"][0]["embedding"]
        return np.frombuffer(base64.b64decode(encoded), dtype="<f4")


@dataclass(slots=True)
class Probe:
    """A request's place in the index: where an answer to it is remembered once complete."""

    namespace: str
    vector: np.ndarray


class SemanticCache:
    def __init__(
        self, threshold: float, embedder: Embedder, index: VectorIndex, answers: CacheBackend
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"the semantic cache threshold must be in (0, 1], not {threshold}")
        self.threshold = threshold
        self.embedder = embedder
        self.index = index
        self.answers = answers
        self.hits = 0
        self.misses = 0
        self.errors = 0  # no embedding (no engine, or one that computes none): answered as a miss

    @classmethod
    def open(
        cls, threshold: float, source: str, ttl_s: float, answers: CacheBackend, embedder: Embedder
    ) -> SemanticCache:
        """`source`: the response cache's (`memory`, or Redis: then the index is shared there too)."""
        index: VectorIndex = MemoryIndex() if source == "memory" else RedisIndex(source, ttl_s)
        return cls(threshold, embedder, index, answers)

    async def lookup(
        self, tenant: str, route: str, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> tuple[Probe | None, bytes | None]:
        """(where to remember this request's answer, or None; a stored answer to reuse, or None)."""
        if not cacheable(body):
            return None, None
        split = split_request(route, body)
        if split is None:
            return None, None
        rest, text = split
        model = self.embedder.model_for(body)
        # The embedding model is part of the namespace: vectors of two models never meet.
        namespace = cache_key(tenant, f"{route}#semantic:{model}", rest)
        try:
            vector = await self.embedder(model, text)
        except Exception as exc:  # no embedding: a miss, never a failed request
            self.errors += 1
            log.warning("semantic cache: no embedding: %s", exc)
            return None, None
        probe = Probe(namespace, vector)
        if no_cache(headers):
            return probe, None
        try:
            found = await self.index.nearest(namespace, vector)
            if found is not None and found[0] >= self.threshold:
                stored = await self.answers.get(found[1])
                if stored is not None:
                    self.hits += 1
                    return probe, stored
        except Exception as exc:
            log.warning("semantic cache: lookup failed: %s", exc)
        self.misses += 1
        return probe, None

    async def remember(self, probe: Probe, key: str) -> None:
        """Index a complete answer, already stored under `key`."""
        try:
            await self.index.add(probe.namespace, probe.vector, key)
        except Exception as exc:
            log.warning("semantic cache: indexing failed: %s", exc)

    async def close(self) -> None:
        await self.index.close()
