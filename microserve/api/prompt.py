"""Prompt -> token ids, as the engine computes them and the router predicts them: a chat is rendered
with the model's template and encoded without special tokens (the template carries BOS and role
markers); a text prompt is encoded with them; a token-id prompt is checked against the vocabulary."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from pydantic import ValidationError

from microserve.api.errors import APIError, bad_request
from microserve.api.protocol import ChatMessage, ToolSpec, validation_error


class PromptTokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str: ...


def chat_prompt_ids(
    tokenizer: PromptTokenizer,
    messages: list[dict[str, Any]],
    check_text: Callable[[str], None] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """`check_text` sees the rendered text before it is encoded (the engine bounds its length there);
    `tools` reach the template as transformers passes them."""
    try:
        kwargs = {"tools": tools} if tools else {}
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except ValueError as exc:  # ChatTemplateError: the template rejected the conversation
        raise bad_request(
            f"The chat template cannot render these messages: {exc}", param="messages"
        ) from None
    if check_text is not None:
        check_text(text)
    return tokenizer.encode(text, add_special_tokens=False)


def text_prompt_ids(tokenizer: PromptTokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    vocab_size = tokenizer.vocab_size
    for i, tok in enumerate(prompt):
        if not 0 <= tok < vocab_size:
            raise bad_request(
                f"prompt token id {tok} at position {i} is outside the vocabulary [0, {vocab_size}).",
                param="prompt",
            )
    return list(prompt)


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Messages as the template sees them, from validated `ChatMessage`s or raw JSON objects."""
    try:
        parsed = [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]
    except ValidationError as exc:
        raise validation_error(exc) from None
    for i, m in enumerate(parsed):
        m.check(f"messages.{i}.content")
    return [m.for_template() for m in parsed]


def template_tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A raw chat body's `tools` as the template sees them (validated by the request model already)."""
    tools = body.get("tools")
    if not tools:
        return None
    return [ToolSpec.model_validate(t).model_dump(exclude_none=True) for t in tools]


def body_prompt_ids(
    tokenizer: PromptTokenizer, chat: bool, body: Mapping[str, Any], max_model_len: int | None = None
) -> list[int]:
    """The ids the engine computes for a raw request body (one prompt). With `max_model_len`, a prompt
    whose characters alone show it cannot fit is refused before it is tokenized (as the engine does)."""
    bound = None
    if max_model_len is not None:
        chars = max_token_chars(tokenizer)
        bound = functools.partial(check_prompt_chars, max_model_len=max_model_len, chars_per_token=chars)
    if chat:
        check = None if bound is None else functools.partial(bound, param="messages")
        return chat_prompt_ids(tokenizer, template_messages(body["messages"]), check, template_tools(body))
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str) and bound is not None:
        bound(prompt, param="prompt")
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return text_prompt_ids(tokenizer, prompt)
    raise bad_request("prompt must be one string or one list of token ids here.", param="prompt")


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
