"""What one request may cost the engine before it is refused: the body limit of each route, sized to the
context, and the prompt's length bounded from its characters before the prompt is tokenized whole.

A prompt that cannot fit is refused in microseconds; one that might fit is tokenized off the event loop.
"""

from __future__ import annotations

from typing import Any

from microserve.api.errors import APIError
from microserve.http.limits import KiB, MiB

# A token of real text is 3-5 bytes of JSON; 16 covers JSON-escaped non-ASCII text and token-id lists
# (up to 7 bytes an id). The router sizes its own limit the same way (--max-body-size).
BODY_BYTES_PER_TOKEN = 16
# Everything but the prompt: sampling fields, stop strings, a chat's roles, a few long system prompts.
BODY_OVERHEAD_BYTES = 1 * MiB
# A KV payload's header (layout, token range, hash) beside the tensors.
KV_HEADER_BYTES = 64 * KiB


def prompt_body_limit(max_model_len: int) -> int:
    """The largest body a route carrying a prompt takes: a full context and then some, never 64 MiB."""
    return BODY_OVERHEAD_BYTES + max_model_len * BODY_BYTES_PER_TOKEN


def kv_body_limit(bytes_per_token: int, max_model_len: int) -> int:
    """The largest KV transfer: the whole context's K and V (the sender may send it in one piece)."""
    return KV_HEADER_BYTES + max_model_len * bytes_per_token


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of `tokenizer` covers (1 when the tokenizer cannot tell: a
    byte-level tokenizer without a vocabulary)."""
    return max(1, int(getattr(tokenizer, "max_token_chars", 1)))


def check_prompt_chars(text: str, max_model_len: int, chars_per_token: int, param: str) -> None:
    """Refuse a prompt that cannot fit the context, from its length alone: every token covers at most
    `chars_per_token` characters, so a longer text has more than `max_model_len` tokens. Exact, never a
    guess: a prompt this lets through may still be too long, and the tokenizer (off the loop) says so."""
    bound = max_model_len * chars_per_token
    if len(text) > bound:
        raise context_length_exceeded(
            f"This model's maximum context length is {max_model_len} tokens, and the prompt has "
            f"{len(text)} characters: more than {max_model_len} tokens of at most {chars_per_token} "
            "characters each can hold.",
            param,
        )


def context_length_exceeded(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded")
