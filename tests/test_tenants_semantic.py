"""The semantic cache's logic: what text is compared and what must match exactly, the indexes (in
process and in a real Redis) searching one namespace only within their bounds, and the lookup's rules
(determinism, threshold, no-cache, an embedding that fails is a miss, an answer gone is a miss)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import orjson
import pytest

from microserve.api.embeddings import encode_vector
from microserve.router.config import RouterConfig
from microserve.tenants.cache import MemoryCache, cache_key
from microserve.tenants.semantic import EmbeddingFailed, FleetEmbedder, SemanticCache, split_request
from microserve.tenants.vector_index import MemoryIndex, RedisIndex
from tests.tenant_fleet import start_redis

CHAT = "/v1/chat/completions"


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


class TableEmbedder:
    """Vectors given by the test for each text: the embedding service's part, decided in advance."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table
        self.calls: list[tuple[str | None, str]] = []

    def model_for(self, body: Mapping[str, Any]) -> str | None:
        return body.get("model")

    async def __call__(self, model: str | None, text: str) -> np.ndarray:
        self.calls.append((model, text))
        if text not in self.table:
            raise RuntimeError("no engine answered")
        return self.table[text]


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": text}], **extra}


def test_split_request_compares_only_the_last_message() -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hi there", "name": "x"}]}  # fmt: skip
    rest, text = split_request(CHAT, body)  # type: ignore[misc]
    assert text == "Hi there"
    assert rest["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "name": "x"}]
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]
    }
    assert split_request(CHAT, parts)[1] == "a\nb"  # type: ignore[index]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert split_request(CHAT, image) is None
    assert split_request(CHAT, {"messages": []}) is None
    assert split_request("/v1/completions", {"prompt": ["one"]}) == ({}, "one")
    assert split_request("/v1/completions", {"prompt": [1, 2, 3]}) is None
    assert split_request("/v1/completions", {"prompt": ["a", "b"]}) is None


async def test_memory_index_nearest_within_a_namespace_and_bounded() -> None:
    index = MemoryIndex(max_per_namespace=2, max_vectors=3)
    assert await index.nearest("a", unit(1, 0)) is None
    await index.add("a", unit(1, 0), "k1")
    await index.add("a", unit(0, 1), "k2")
    score, key = await index.nearest("a", unit(1, 0.1))  # type: ignore[misc]
    assert key == "k1" and score == pytest.approx(float(unit(1, 0) @ unit(1, 0.1)))
    assert await index.nearest("b", unit(1, 0)) is None  # another namespace sees nothing
    await index.add("a", unit(-1, 0), "k3")  # the oldest of "a" goes
    assert (await index.nearest("a", unit(1, 0)))[1] != "k1"  # type: ignore[index]
    assert index.size == 2
    await index.add("b", unit(1, 0), "b1")
    await index.add("c", unit(1, 0), "c1")  # over 3 in all: the namespace searched least recently goes
    assert await index.nearest("a", unit(1, 0)) is None
    assert index.size == 2


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    yield from start_redis()


async def test_redis_index_nearest_within_a_namespace_and_bounded(redis_url: str) -> None:
    index = RedisIndex(redis_url, ttl_s=60, max_per_namespace=2, prefix="unit-semantic:")
    k = [f"{i:064x}" for i in range(4)]
    try:
        assert await index.nearest("a", unit(1, 0)) is None
        await index.add("a", unit(1, 0), k[0])
        await index.add("a", unit(0, 1), k[1])
        await index.add("b", unit(1, 0), k[3])
        score, key = await index.nearest("a", unit(1, 0.1))  # type: ignore[misc]
        assert key == k[0] and score == pytest.approx(float(unit(1, 0) @ unit(1, 0.1)), abs=1e-6)
        await index.add("a", unit(0, -1), k[2])  # trimmed to the newest two
        assert (await index.nearest("a", unit(1, 0)))[1] in (k[1], k[2])  # type: ignore[index]
        assert (await index.nearest("b", unit(0, 1)))[1] == k[3]  # type: ignore[index]
        with pytest.raises(ValueError):
            await index.add("a", unit(1, 0), "short")
    finally:
        await index.close()


def cache_with(table: dict[str, np.ndarray], threshold: float = 0.9) -> tuple[SemanticCache, MemoryCache]:
    answers = MemoryCache()
    return SemanticCache(threshold, TableEmbedder(table), MemoryIndex(), answers), answers


async def remember(
    cache: SemanticCache, answers: MemoryCache, tenant: str, body: dict, answer: bytes
) -> None:
    probe, stored = await cache.lookup(tenant, CHAT, body, {})
    assert probe is not None and stored is None
    key = cache_key(tenant, CHAT, body)
    await answers.put(key, answer)
    await cache.remember(probe, key)


async def test_lookup_reuses_a_close_answer_of_the_same_tenant_only() -> None:
    cache, answers = cache_with({"capital of France?": unit(1, 0), "France's capital?": unit(1, 0.2),
                                 "bake bread?": unit(0, 1)})  # fmt: skip
    await remember(cache, answers, "A", chat("capital of France?"), b"Jparis")
    assert (await cache.lookup("A", CHAT, chat("France's capital?"), {}))[1] == b"Jparis"
    assert (await cache.lookup("A", CHAT, chat("bake bread?"), {}))[1] is None
    assert (await cache.lookup("B", CHAT, chat("France's capital?"), {}))[1] is None  # another tenant
    # Everything but the last message must match: sampling, stream, the conversation before it.
    assert (await cache.lookup("A", CHAT, chat("France's capital?", max_tokens=5), {}))[1] is None
    assert (await cache.lookup("A", CHAT, chat("France's capital?", stream=True), {}))[1] is None
    assert (cache.hits, cache.misses) == (1, 5)  # the first lookup (in remember) missed too


async def test_lookup_rules() -> None:
    cache, answers = cache_with({"q": unit(1, 0), "p": unit(1, 0.2)}, threshold=0.999)
    await remember(cache, answers, "A", chat("q"), b"Janswer")
    assert (await cache.lookup("A", CHAT, chat("p"), {}))[1] is None  # below the threshold
    cache.threshold = 0.9
    probe, stored = await cache.lookup("A", CHAT, chat("p"), {"cache-control": "no-cache"})
    assert probe is not None and stored is None  # asked afresh, and remembered once answered
    sampled = {**chat("p"), "temperature": 0.7}
    assert await cache.lookup("A", CHAT, sampled, {}) == (None, None)  # not deterministic
    assert await cache.lookup("A", CHAT, chat("unknown text"), {}) == (None, None)  # no embedding
    assert cache.errors == 1
    answers._entries.clear()  # the answer expired from the store: the index entry is a miss
    assert (await cache.lookup("A", CHAT, chat("p"), {}))[1] is None


def test_config_needs_the_response_cache_and_a_threshold_in_range() -> None:
    with pytest.raises(ValueError, match="needs --response-cache"):
        RouterConfig(semantic_cache=0.9)
    with pytest.raises(ValueError, match="threshold"):
        RouterConfig(semantic_cache=1.5, response_cache="memory")
    assert RouterConfig(semantic_cache=0.9, response_cache="memory").semantic_cache == 0.9


async def test_fleet_embedder_requests() -> None:
    sent: list[dict[str, Any]] = []
    vector = unit(3, 4)

    async def forward(path: str, body: bytes) -> tuple[int, bytes]:
        assert path == "/v1/embeddings"
        sent.append(orjson.loads(body))
        return 200, orjson.dumps({"data": [{"embedding": encode_vector(vector.tolist(), "base64")}]})

    got = await FleetEmbedder(forward)("m", "Hi?")
    np.testing.assert_allclose(got, vector, atol=1e-7)
    assert sent[-1] == {"model": "m", "input": 'This sentence : "Hi?" means in one word:"',
                        "encoding_format": "base64", "pooling": "last"}  # fmt: skip
    embedder = FleetEmbedder(forward, "bge", "plain")
    await embedder(embedder.model_for({"model": "m"}), "Hi?")
    assert sent[-1] == {"model": "bge", "input": "Hi?", "encoding_format": "base64"}

    async def refusing(path: str, body: bytes) -> tuple[int, bytes]:
        return 400, b'{"error": {"code": "embeddings_unsupported"}}'

    with pytest.raises(EmbeddingFailed, match="400"):
        await FleetEmbedder(refusing)("m", "Hi?")
