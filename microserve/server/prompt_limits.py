"""What one request may cost the engine before it is refused: the body limit of each route, sized to the
context. The prompt's length is bounded from its characters before it is tokenized whole
(`microserve.api.prompt.check_prompt_chars`, shared with the router).
"""

from __future__ import annotations

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
