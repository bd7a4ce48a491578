"""The semantic cache through a router in front of a real torch engine (the bundled model's embeddings),
with keys on, through the official openai client: a paraphrase is answered from the cache, an
unrelated question is not, another tenant never gets the first tenant's answer, and a stream replays
as a stream. /v1/embeddings through the router, with its key."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from microserve.processes import ManagedProcess, start_engine
from microserve.router.app import RouterServer
from microserve.router.config import RouterConfig
from microserve.router.router import Router
from microserve.router.workers import WorkerKind, WorkerSpec
from microserve.tenants.cache import CACHE_HEADER
from tests.tenant_fleet import start_redis

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
ENGINE_ARGS = ("--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory", "128MiB")
KEYS = {"A": "sk-ms-tenant-a", "B": "sk-ms-tenant-b"}
# A pair of the paraphrase set at 0.984 with the bundled model (PromptEOL), an unrelated question far
# below; the threshold between (the default, 0.99, is stricter: see docs/tenants.md).
THRESHOLD = 0.95
QUESTION = "How many legs does a spider have?"
PARAPHRASE = "What is the number of legs on a spider?"
UNRELATED = "How do I bake bread?"


@pytest.fixture(scope="module")
def engine() -> Iterator[ManagedProcess]:
    started = start_engine(*ENGINE_ARGS, timeout=300)
    try:
        yield started
    finally:
        started.stop()


@asynccontextmanager
async def tenants(
    engine: ManagedProcess, tmp_path: Path, cache: str = "memory"
) -> AsyncIterator[dict[str, openai.AsyncOpenAI]]:
    keys = tmp_path / "keys.json"
    records = [{"id": t, "tenant": t, "key": k} for t, k in KEYS.items()]
    keys.write_bytes(orjson.dumps({"keys": records}))
    config = RouterConfig(
        workers=[WorkerSpec(engine.url, kind=WorkerKind.MICROSERVE)],
        api_keys=str(keys),
        response_cache=cache,
        semantic_cache=THRESHOLD,
    )
    async with RouterServer(Router(config)) as server:
        clients = {
            t: openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=k, max_retries=0)
            for t, k in KEYS.items()
        }
        try:
            yield clients
        finally:
            for client in clients.values():
                await client.close()


async def ask(client: openai.AsyncOpenAI, question: str) -> tuple[str | None, str]:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0
    )
    return raw.headers.get(CACHE_HEADER), raw.parse().choices[0].message.content or ""


async def test_paraphrase_hit_unrelated_miss_and_tenant_isolation(
    engine: ManagedProcess, tmp_path: Path
) -> None:
    async with tenants(engine, tmp_path) as sdk:
        status, answer = await ask(sdk["A"], QUESTION)
        assert status == "miss"
        assert await ask(sdk["A"], PARAPHRASE) == ("semantic-hit", answer)
        assert (await ask(sdk["A"], UNRELATED))[0] == "miss"
        # Tenant B asks the very paraphrase: computed afresh, never tenant A's answer.
        assert (await ask(sdk["B"], PARAPHRASE))[0] == "miss"
        assert (await ask(sdk["B"], QUESTION))[0] == "semantic-hit"  # B's own answer, remembered
        async with httpx.AsyncClient(base_url=str(sdk["A"].base_url).removesuffix("/v1/")) as http:
            metrics = (await http.get("/metrics")).text
        assert 'microserve_router_semantic_cache_lookups_total{result="hit"} 2.0' in metrics
        assert 'microserve_router_semantic_cache_lookups_total{result="miss"} 3.0' in metrics


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    yield from start_redis()


async def test_replicas_sharing_redis_share_the_index(
    engine: ManagedProcess, tmp_path: Path, redis_url: str
) -> None:
    async with tenants(engine, tmp_path, redis_url) as one, tenants(engine, tmp_path, redis_url) as two:
        status, answer = await ask(one["A"], QUESTION)
        assert status == "miss"
        assert await ask(two["A"], PARAPHRASE) == ("semantic-hit", answer)
        assert (await ask(two["B"], PARAPHRASE))[0] == "miss"


async def stream_chunks(client: openai.AsyncOpenAI, question: str) -> tuple[str | None, list[dict[str, Any]]]:
    async with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=12,
        temperature=0,
        stream=True,
    ) as raw:
        status = raw.headers.get(CACHE_HEADER)
        chunks = [chunk.model_dump() async for chunk in await raw.parse()]
    return status, chunks


async def test_a_stream_replays_as_the_same_stream(engine: ManagedProcess, tmp_path: Path) -> None:
    async with tenants(engine, tmp_path) as sdk:
        status, first = await stream_chunks(sdk["A"], QUESTION)
        assert status == "miss" and len(first) > 2
        status, again = await stream_chunks(sdk["A"], PARAPHRASE)
        assert status == "semantic-hit"
        assert again == first  # chunk by chunk, ids included: the answer as it was sent
        status, _ = await ask(sdk["A"], PARAPHRASE)
        assert status == "miss"  # a whole answer is another namespace than a stream


async def test_embeddings_through_the_router_need_a_key(engine: ManagedProcess, tmp_path: Path) -> None:
    async with tenants(engine, tmp_path) as sdk:
        got = await sdk["A"].embeddings.create(model=MODEL, input=[QUESTION, PARAPHRASE])
        assert len(got.data) == 2 and got.usage.prompt_tokens > 0
        nobody = openai.AsyncOpenAI(base_url=str(sdk["A"].base_url), api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await nobody.embeddings.create(model=MODEL, input="hi")
        await nobody.close()
