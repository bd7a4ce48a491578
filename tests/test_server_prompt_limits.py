"""The engine's bounds on one request before its expensive part: body limits sized to the context, the
characters-per-token bound that refuses an over-long prompt before it is tokenized, and the tokenizer
facts that bound rests on."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from microserve.api.prompt import body_prompt_ids, check_prompt_chars, max_token_chars
from microserve.http.limits import KiB, MiB
from microserve.model.tokenizer import RELEASE_GIL_CHARS, Tokenizer
from microserve.server.errors import APIError
from microserve.server.prompt_limits import kv_body_limit, prompt_body_limit
from tests.fake_engine import FakeTokenizer


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Tokenizer:
    return Tokenizer.load(model_path)


def test_body_limits_follow_the_context() -> None:
    assert prompt_body_limit(8192) == 1 * MiB + 8192 * 16
    assert prompt_body_limit(262_144) == 5 * MiB  # a 256K context: 4 MiB of prompt, 1 MiB of the rest
    assert kv_body_limit(bytes_per_token=46_080, max_model_len=2048) == 64 * KiB + 2048 * 46_080


def test_a_prompt_is_refused_from_its_length_only_above_the_bound() -> None:
    check_prompt_chars("x" * 640, max_model_len=64, chars_per_token=10, param="prompt")
    with pytest.raises(APIError) as err:
        check_prompt_chars("x" * 641, max_model_len=64, chars_per_token=10, param="messages")
    assert (err.value.status, err.value.code, err.value.param) == (400, "context_length_exceeded", "messages")
    assert "maximum context length is 64 tokens" in err.value.message


def test_max_token_chars_of_the_bundled_tokenizer_and_a_byte_tokenizer(tokenizer: Tokenizer) -> None:
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    assert tokenizer.max_token_chars == max(len(t) for t in vocab) == 81  # a run of 80 '#' and a newline run
    assert max_token_chars(tokenizer) == 81
    assert max_token_chars(FakeTokenizer()) == 1  # one byte a token: never fewer tokens than characters


def test_no_text_has_fewer_tokens_than_its_characters_over_the_bound(tokenizer: Tokenizer) -> None:
    rng = random.Random(7)
    alphabet = "ab #=\n\t.,é中😀" + "".join(chr(c) for c in range(0x20, 0x7F))
    texts = ["#" * 5000, " " * 5000, "\n" * 3000, "é" * 2000, "😀" * 1000]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3000))) for _ in range(20)]
    bound = tokenizer.max_token_chars
    for text in texts:
        assert len(text) <= len(tokenizer.encode(text, add_special_tokens=False)) * bound


def test_a_long_text_tokenizes_to_the_same_ids_on_the_gil_free_path(tokenizer: Tokenizer) -> None:
    text = "Once upon a time, in a land far away, " * (RELEASE_GIL_CHARS // 20)
    assert len(text) > RELEASE_GIL_CHARS
    assert tokenizer.encode(text) == tokenizer.backend.encode(text, add_special_tokens=True).ids


class NeverEncodes:
    """A tokenizer whose encode must not be reached: the bound refuses the prompt first."""

    def __init__(self, real: Tokenizer) -> None:
        self.real = real
        self.vocab_size = real.vocab_size
        self.max_token_chars = real.max_token_chars

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise AssertionError(f"tokenized {len(text)} characters that cannot fit")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.real.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("chat", [False, True])
def test_the_router_refuses_a_prompt_too_long_to_fit_before_tokenizing_it(
    tokenizer: Tokenizer, chat: bool
) -> None:
    """The router's prompt ids (for prefix-aware policies and PD) run on its event loop: what it tokenizes
    is bounded by the context the engines report, with the engine's own 400."""
    text = "word " * (1024 * tokenizer.max_token_chars // 5 + 1)  # more characters than 1024 tokens can hold
    body = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    with pytest.raises(APIError) as refused:
        body_prompt_ids(NeverEncodes(tokenizer), chat, body, max_model_len=1024)
    assert refused.value.status == 400 and refused.value.code == "context_length_exceeded"
    assert refused.value.param == ("messages" if chat else "prompt")
    short = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    assert body_prompt_ids(tokenizer, chat, short, max_model_len=1024) == body_prompt_ids(
        tokenizer, chat, short
    )
