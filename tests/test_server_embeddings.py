"""The engine's /v1/embeddings: mean-pooled final hidden states checked against transformers, the
OpenAI shape (floats and base64) through the official client, and every bad input as a 400."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import openai
import pytest
import pytest_asyncio
import torch

from microserve.engine.async_engine import AsyncEngine
from microserve.engine.core import EngineCore
from microserve.server.app import EngineApp
from microserve.server.engine_main import engine_app
from tests.conftest import make_core
from tests.fake_engine import FakeEngine

MODEL = "smollm2-135m"
TEXTS = ["The cat sat on the mat.", "How do I reset my password?", "Paris is the capital of France."]


def oracle(hf_model, ids: list[int]) -> np.ndarray:
    """transformers' last_hidden_state for the ids, mean-pooled and L2-normalised."""
    with torch.inference_mode():
        hidden = hf_model.model(torch.tensor([ids])).last_hidden_state[0]
    pooled = hidden.mean(0)
    return (pooled / pooled.norm()).numpy()


@pytest.mark.slow
def test_embeddings_match_transformers(core: EngineCore, hf_model) -> None:
    prompts = [core.tokenizer.encode(t) for t in TEXTS]
    got = np.array(core.embed(prompts))  # batched: each input attends to itself only
    assert got.shape == (3, hf_model.config.hidden_size)
    for row, ids in zip(got, prompts, strict=True):
        want = oracle(hf_model, ids)
        assert np.linalg.norm(row) == pytest.approx(1.0, abs=1e-5)
        assert float(row @ want) > 0.9999
        np.testing.assert_allclose(row, want, atol=2e-3)
    last = np.array(core.embed(prompts, "last"))
    for row, ids in zip(last, prompts, strict=True):
        with torch.inference_mode():
            want = hf_model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        np.testing.assert_allclose(row, (want / want.norm()).numpy(), atol=2e-3)
    alone = np.array(core.embed([prompts[1]]))[0]
    np.testing.assert_allclose(alone, got[1], atol=1e-5)  # batching changes nothing
    assert not core.has_work()


@pytest_asyncio.fixture
async def sdk(core: EngineCore) -> AsyncIterator[tuple[openai.AsyncOpenAI, EngineApp]]:
    app = engine_app(AsyncEngine(core, model_name=MODEL))
    async with app:
        client = openai.AsyncOpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)
        try:
            yield client, app
        finally:
            await client.close()


async def test_openai_client_floats_and_base64(sdk, core: EngineCore) -> None:
    client, _ = sdk
    # The official client asks for base64 unless told otherwise, and decodes it to floats itself.
    b64 = await client.embeddings.create(model=MODEL, input=TEXTS)
    floats = await client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert b64.model == MODEL and b64.object == "list"
    assert [d.index for d in b64.data] == [0, 1, 2]
    ids = [core.tokenizer.encode(t) for t in TEXTS]
    assert b64.usage.prompt_tokens == b64.usage.total_tokens == sum(map(len, ids))
    for a, b in zip(b64.data, floats.data, strict=True):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-6)
    direct = np.array(core.embed(ids))
    np.testing.assert_allclose(np.array([d.embedding for d in floats.data]), direct, atol=1e-5)
    one = await client.embeddings.create(model=MODEL, input=ids[0], encoding_format="float")
    assert len(one.data) == 1  # a list of ints is one tokenized input
    np.testing.assert_allclose(one.data[0].embedding, direct[0], atol=1e-5)
    size = len(direct[0])
    same = await client.embeddings.create(model=MODEL, input="x", dimensions=size)
    assert len(same.data[0].embedding) == size


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": "hi", "dimensions": 64}, "dimensions"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"input": [[1, 2], [10**9]]}, "prompt"),
        ({"input": "hi", "model": "other"}, "model"),
        ({"input": "hi", "pooling": "cls"}, "pooling"),
        ({"input": "hi", "normalize": False}, "normalize"),
    ],
)
async def test_bad_inputs_are_400s(sdk, extra: dict, param: str) -> None:
    client, _ = sdk
    body = {"model": MODEL, **extra}
    kind = openai.NotFoundError if param == "model" else openai.BadRequestError
    with pytest.raises(kind) as info:
        await client.post("/embeddings", body=body, cast_to=object)
    assert info.value.body["param"] == param  # type: ignore[index]


async def test_too_long_input_is_context_length_exceeded(sdk, core: EngineCore) -> None:
    client, _ = sdk
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model=MODEL, input=[[1] * (core.max_model_len + 1)])
    assert info.value.code == "context_length_exceeded"


async def test_an_engine_without_hidden_states_refuses() -> None:
    app = EngineApp(FakeEngine(reply="x"))
    async with app:
        client = openai.AsyncOpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            await client.embeddings.create(model="fake-model", input="hi")
        assert info.value.code == "embeddings_unsupported"
        await client.close()


async def test_the_sim_backend_refuses() -> None:
    app = engine_app(AsyncEngine(make_core(backend="sim"), model_name=MODEL))
    async with app:
        client = openai.AsyncOpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            await client.embeddings.create(model=MODEL, input="hi")
        assert info.value.code == "embeddings_unsupported"
        await client.close()
