"""OpenAI's /v1/embeddings: the request (a string, strings, token ids or lists of them) and the answer
(floats or base64 of little-endian float32, as the official client decodes it; usage in prompt tokens)."""

from __future__ import annotations

import base64
import struct
from typing import Any, Literal

from pydantic import NonNegativeInt, PositiveInt

from microserve.api.errors import bad_request
from microserve.api.prompt import PromptTokenizer, check_prompt_chars, max_token_chars, text_prompt_ids
from microserve.api.protocol import RequestModel

MAX_INPUTS = 2048  # OpenAI's bound on the inputs of one request


class EmbeddingRequest(RequestModel):
    model: str | None = None
    input: str | list[str] | list[NonNegativeInt] | list[list[NonNegativeInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None
    # microserve's extension: the mean of every token's final hidden state (default), or the last
    # token's (for a prompt written to end on a summary of the text, as the semantic cache sends).
    pooling: Literal["mean", "last"] = "mean"

    def inputs(self) -> list[str | list[int]]:
        """The inputs, one per embedding: a list of ints is one tokenized input, not several."""
        given = self.input
        if isinstance(given, str):
            return [given]
        if not given:
            raise bad_request("input must not be empty.", param="input")
        if all(isinstance(x, int) for x in given):
            return [list(given)]  # type: ignore[arg-type]
        inputs: list[str | list[int]] = list(given)  # type: ignore[arg-type]
        if len(inputs) > MAX_INPUTS:
            raise bad_request(f"input takes at most {MAX_INPUTS} items.", param="input")
        return inputs


def input_ids(tokenizer: PromptTokenizer, req: EmbeddingRequest, max_model_len: int) -> list[list[int]]:
    """Each input's token ids (text encoded as a completion prompt is); an empty one is refused."""
    chars = max_token_chars(tokenizer)
    prompts: list[list[int]] = []
    for i, item in enumerate(req.inputs()):
        if isinstance(item, str):
            check_prompt_chars(item, max_model_len, chars, "input")
        ids = text_prompt_ids(tokenizer, item)
        if not ids:
            raise bad_request(f"input {i} is empty.", param="input")
        if len(ids) > max_model_len:
            raise bad_request(
                f"input {i} has {len(ids)} tokens; this model's context is {max_model_len} tokens.",
                param="input",
                code="context_length_exceeded",
            )
        prompts.append(ids)
    return prompts


def check_dimensions(req: EmbeddingRequest, size: int) -> None:
    """The model's hidden size is the only size served: truncating a mean-pooled vector is not an
    embedding it was trained to make (no Matryoshka training here)."""
    if req.dimensions is not None and req.dimensions != size:
        raise bad_request(
            f"dimensions {req.dimensions} is not supported: this model's embeddings have {size}.",
            param="dimensions",
        )


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def embedding_answer(
    model: str, vectors: list[list[float]], prompt_tokens: int, encoding_format: str
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
