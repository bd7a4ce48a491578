"""vLLM's /tokenize and /detokenize: request models and answers, over any tokenizer with a template."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import NonNegativeInt

from microserve.api.errors import bad_request
from microserve.api.prompt import PromptTokenizer, chat_prompt_ids, template_messages
from microserve.api.protocol import ChatMessage, RequestModel, ToolSpec


class TokenizeRequest(RequestModel):
    """Either `prompt` (text) or `messages` (rendered with the chat template), as vLLM takes them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolSpec] | None = None  # rendered with the messages, as a chat request renders them
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[NonNegativeInt]


def tokenize(
    tokenizer: PromptTokenizer, req: TokenizeRequest, max_model_len: int, token_text: Any = None
) -> dict[str, Any]:
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("Send either prompt or messages.", param="prompt")
    if req.messages is not None:
        messages = template_messages(req.messages)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        with_tools: dict[str, Any] = {"tools": tools} if tools else {}
        if req.add_special_tokens:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt, **with_tools
            )
            ids = tokenizer.encode(text, add_special_tokens=True)
        elif req.add_generation_prompt:
            ids = chat_prompt_ids(tokenizer, messages, tools=tools)
        else:
            ids = tokenizer.encode(
                tokenizer.apply_chat_template(messages, add_generation_prompt=False, **with_tools), False
            )
    else:
        assert req.prompt is not None
        ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    strs = [token_text(t) for t in ids] if req.return_token_strs and token_text is not None else None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(decode: Any, req: DetokenizeRequest, vocab_size: int) -> dict[str, Any]:
    if any(t >= vocab_size for t in req.tokens):
        raise bad_request(f"tokens must be in [0, {vocab_size}).", param="tokens")
    return {"prompt": decode(req.tokens)}


def server_version() -> dict[str, str]:
    try:
        return {"version": version("microserve")}
    except PackageNotFoundError:
        return {"version": "0+unknown"}
