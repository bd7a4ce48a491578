"""The engine's /v1/embeddings below its HTTP handler: admit, tokenize, pool on the engine, shape."""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from microserve.api.embeddings import EmbeddingRequest, check_dimensions, embedding_answer, input_ids
from microserve.api.errors import APIError, bad_request
from microserve.engine.errors import EmbeddingsUnsupported, EngineDead
from microserve.server import errors
from microserve.server.handlers import ServerState

# Above this many input characters, tokenizing runs in a thread (as prompts do: handlers.OFFLOAD_BODY_BYTES).
OFFLOAD_CHARS = 64 * 1024


@runtime_checkable
class EmbeddingEngine(Protocol):
    async def embed(self, prompts: list[list[int]], pooling: str = "mean") -> list[list[float]]: ...


async def embeddings(state: ServerState, req: EmbeddingRequest, body_size: int) -> dict[str, object]:
    model = state.resolve_model(req.model)
    engine = state.engine
    if not isinstance(engine, EmbeddingEngine):
        raise unsupported()
    state.admit()
    tokenizer, limit = engine.tokenizer, engine.max_model_len
    if body_size > OFFLOAD_CHARS:
        prompts = await asyncio.to_thread(input_ids, tokenizer, req, limit)
    else:
        prompts = input_ids(tokenizer, req, limit)
    try:
        vectors = await engine.embed(prompts, req.pooling)
    except EmbeddingsUnsupported:
        raise unsupported() from None
    except EngineDead as exc:
        raise errors.engine_dead(str(exc) or "The engine stopped.") from None
    except ValueError as exc:
        raise bad_request(str(exc), param="input") from None
    check_dimensions(req, len(vectors[0]))
    return embedding_answer(model, vectors, sum(map(len, prompts)), req.encoding_format)


def unsupported() -> APIError:
    return bad_request(
        "This engine computes no embeddings (its backend has no hidden states: the sim backend).",
        code="embeddings_unsupported",
    )
