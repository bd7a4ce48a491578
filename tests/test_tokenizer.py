"""Tokenizer, chat template and incremental detokenizer, checked against transformers on the bundled model.

transformers loads the same GGUF as the oracle; synthetic files cover what the bundled one does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from microserve.model.detokenizer import IncrementalDetokenizer
from microserve.model.tokenizer import ChatTemplateError, Tokenizer

TEXTS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, don't you think?",
    "héllo wörld — ça va? naïve café",
    "日本語のテキストと中文\uff0c还有한국어",
    "emoji 🤖👍🏽 family 👨‍👩‍👧 flag 🇫🇷!",
    "Ελληνικά и русский, नमस्ते, עברית",
    "def f(x):\n    return x**2  # square\n",
    "if (a && b) { return c->d[i]; }\n\tpass",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n\n\n  \t end",
    "version 3.14 released 2024-01-01 at 12:30, pi=3.14159",
    "<|im_start|>user\nhi<|im_end|>\n",
    "text<|endoftext|>more<repo_name>x<file_sep>y",
    "a <|im_start|> b",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is RoPE?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, in 日本語 please 🙏"},
    ],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Say <|im_end|> literally"},
        {"role": "assistant", "content": "  spaced\n\nanswer  "},
    ],
    [{"role": "user", "content": "", "name": None, "tool_calls": None}],
    [
        {"role": "user", "content": "code:\n```python\nprint('x')\n```"},
        {"role": "assistant", "content": "ok"},
    ],
]


@pytest.fixture(scope="module")
def gguf_path(model_path: Path) -> Path:
    return model_path


@pytest.fixture(scope="module")
def tok(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def ref(gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def smollm_oracle(ref) -> tokenizers.Tokenizer:
    """transformers' tokenizer with SmolLM's real pre-tokenizer (digits split first), which its GGUF
    loader leaves out; ours follows llama.cpp's `smollm` pre-tokenizer and SmolLM's tokenizer.json."""
    oracle = tokenizers.Tokenizer.from_str(ref.backend_tokenizer.to_str())
    oracle.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return oracle


# --- encode / decode -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok: Tokenizer, ref, text: str) -> None:
    assert tok.encode(text) == ref.encode(text)
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(tok: Tokenizer, ref, text: str) -> None:
    ids = ref.encode(text)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("    12345", ["ĠĠĠĠ", "1", "2", "3", "4", "5"]),
        ("x\n\n1", ["x", "ĊĊ", "1"]),
        ("a  1", ["a", "ĠĠ", "1"]),
    ],
)
def test_digits_split_like_smollm(tok: Tokenizer, ref, smollm_oracle, text: str, tokens: list[str]) -> None:
    ids = tok.encode(text)
    assert [tok.id_to_token(i) for i in ids] == tokens
    assert ids == smollm_oracle.encode(text).ids
    # transformers' GGUF loader splits whitespace before digits the plain GPT-2 way instead.
    assert ids != ref.encode(text)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_encode_random_text_matches_oracle(tok: Tokenizer, smollm_oracle, text: str) -> None:
    ids = tok.encode(text)
    assert ids == smollm_oracle.encode(text).ids
    if _representable(tok, text):
        assert tok.decode(ids, skip_special_tokens=False) == text


def _representable(tok: Tokenizer, text: str) -> bool:
    """SmolLM2's vocabulary lacks a few byte tokens (0x04, 0xF1, ...): BPE drops those bytes."""
    return all(tok.decode(tok.encode(c), skip_special_tokens=False) == c for c in set(text))


def test_special_tokens(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|><|endoftext|>") == [2, 0]
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (1, 2, frozenset({2}))
    assert tok.vocab_size == 49152
    assert tok.id_to_token(2) == "<|im_end|>"
    # SmolLM2's GGUF says add_bos_token = false.
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
    assert tok.decode([1, 28, 2]) == ","
    assert tok.decode([1, 28, 2], skip_special_tokens=False) == "<|im_start|>,<|im_end|>"


# --- chat template ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_identical_to_transformers(
    tok: Tokenizer, ref, messages, add_generation_prompt
) -> None:
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    their_ids = ref.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert tok.encode(ours, add_special_tokens=False) == their_ids


@pytest.mark.slow
def test_chat_template_content_parts_flatten_to_text(tok: Tokenizer, ref) -> None:
    parts = [{"type": "text", "text": "first part"}, {"type": "text", "text": "second"}]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "sys"}]},
        {"role": "user", "content": parts},
    ]
    flat = [{"role": "system", "content": "sys"}, {"role": "user", "content": "first part\nsecond"}]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(
        flat, tokenize=False, add_generation_prompt=True
    )


# Exercises what transformers' environment adds to plain jinja2.
FEATURE_TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'stop' %}{% break %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% generation %}[{{ m.role }}] {{ m.content }}{% endgeneration %}
{% endfor %}
count={{ ns.n }} tools={{ tools | tojson }} extra={{ extra | tojson(indent=2) }}
{{ dict(a=1) | tojson }}{% if add_generation_prompt %}<go>{{ eos_token }}{% endif %}"""


@pytest.mark.slow
def test_template_features_identical_to_transformers(tok: Tokenizer, ref) -> None:
    custom = Tokenizer(
        tok.backend, eos_token="<|im_end|>", bos_token="<|im_start|>", chat_template=FEATURE_TEMPLATE
    )
    messages = [
        {"role": "user", "content": "<b>&'\"é"},
        {"role": "stop", "content": "x"},
        {"role": "user", "content": "never"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "description": "a < b & c", "parameters": {}}}]
    extra = {"k": ["ü", 1, None]}
    ours = custom.apply_chat_template(messages, tools=tools, extra=extra)
    theirs = ref.apply_chat_template(
        messages,
        chat_template=FEATURE_TEMPLATE,
        tools=tools,
        extra=extra,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert ours == theirs
    assert '"description": "a < b & c"' in ours and "count=1" in ours


def test_chat_template_errors(tok: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        tok.apply_chat_template([])
    no_template = Tokenizer(tok.backend, eos_token="<|im_end|>")
    with pytest.raises(ChatTemplateError, match=r"^this model has no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "hi"}])
    raising = Tokenizer(
        tok.backend, eos_token="<|im_end|>", chat_template="{{ raise_exception('roles must alternate') }}"
    )
    with pytest.raises(ChatTemplateError, match=r"^chat template error: roles must alternate$"):
        raising.apply_chat_template([{"role": "user", "content": "hi"}])
    broken = Tokenizer(tok.backend, eos_token="<|im_end|>", chat_template="{% for %}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
    sandboxed = Tokenizer(tok.backend, eos_token="<|im_end|>", chat_template="{{ messages.append(1) }}")
    with pytest.raises(ChatTemplateError):
        sandboxed.apply_chat_template([{"role": "user", "content": "hi"}])


# --- Hugging Face folder and synthetic GGUF --------------------------------------------------------


@pytest.mark.slow
def test_hf_folder_matches_transformers(ref, tmp_path: Path) -> None:
    ref.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    folder = Tokenizer.load(tmp_path)
    for text in [*TEXTS, "x\n\n1"]:
        assert folder.encode(text) == ref.encode(text)
    for messages in CONVERSATIONS:
        assert folder.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    assert (folder.bos_token_id, folder.eos_token_id, folder.eos_token_ids) == (1, 2, frozenset({0, 2}))


def _byte_alphabet() -> list[str]:
    return list(pre_tokenizers.ByteLevel.alphabet())


def _write_tokenizer_gguf(path: Path, model: str = "gpt2", merges: tuple[str, ...] = ("a b",)) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    tokens = ["<s>", "</s>", "<eot>", *sorted(_byte_alphabet()), "ab", "<think>"]
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3, *[1] * 256, 1, 4])
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_eot_token_id(2)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_synthetic_gguf_bos_and_end_of_generation_ids(tmp_path: Path) -> None:
    _write_tokenizer_gguf(tmp_path / "t.gguf")
    t = Tokenizer.load(tmp_path / "t.gguf")
    ab, think = t.encode("ab", add_special_tokens=False), t.encode("<think>", add_special_tokens=False)
    assert ab == [259] and think == [260]
    assert t.encode("ab") == [0, 259]
    assert t.encode("<s>ab</s>", add_special_tokens=False) == [0, 259, 1]
    assert t.eos_token_ids == frozenset({1, 2}) and t.bos_token_id == 0
    assert t.decode([0, 259, 260, 2]) == "ab<think>"
    assert t.chat_template is None


def test_a_gguf_merge_that_is_not_a_pair_is_refused(tmp_path: Path) -> None:
    _write_tokenizer_gguf(tmp_path / "t.gguf", merges=("a b", "ab"))
    with pytest.raises(ValueError, match="BPE merge 'ab' is not two tokens separated by a space"):
        Tokenizer.from_gguf(tmp_path / "t.gguf")


def test_an_eos_id_outside_the_vocabulary_is_refused(ref, tmp_path: Path) -> None:
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(ValueError, match="eos token id 1000000 is not in the tokenizer's vocabulary"):
        Tokenizer.load(tmp_path)


def test_unsupported_gguf_tokenizer_model(tmp_path: Path) -> None:
    _write_tokenizer_gguf(tmp_path / "spm.gguf", model="llama")
    with pytest.raises(ValueError, match="GGUF tokenizer model 'llama' is not supported"):
        Tokenizer.from_gguf(tmp_path / "spm.gguf")


# --- incremental detokenizer -----------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    tail = detok.flush()
    assert detok.flush() == ""
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


def test_detokenizer_holds_back_split_characters(tok: Tokenizer) -> None:
    text = "日本語 🤖👍🏽 family 👨‍👩‍👧 and 中文!"
    ids = tok.encode(text)
    deltas, tail = _stream(tok, ids)
    assert "" in deltas  # some characters span several tokens, so the test exercises the hold-back
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text and tail == ""


def test_detokenizer_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nhello<|im_end|>")
    assert "".join(_stream(tok, ids)[0]) == "assistant\nhello"
    assert "".join(_stream(tok, ids, skip=False)[0]) == "<|im_start|>assistant\nhello<|im_end|>"


def test_detokenizer_flush_releases_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("🤖")
    assert len(ids) > 1
    deltas, tail = _stream(tok, ids[:-1])
    assert deltas == [""] * (len(ids) - 1)
    assert tail == tok.decode(ids[:-1]) and tail.endswith("\ufffd")


class _CountingTokenizer:
    def __init__(self, inner: Tokenizer) -> None:
        self.inner, self.longest = inner, 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens)


def test_detokenizer_decodes_a_bounded_window(tok: Tokenizer) -> None:
    ids = tok.encode("Streaming 中文 and emoji 🤖 text, many times over. " * 100)
    counting = _CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting)  # type: ignore[arg-type]
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == tok.decode(ids)
    assert len(ids) > 1000 and counting.longest <= 8


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=40), cut=st.tuples(st.integers(0, 100), st.integers(0, 100)))
def test_detokenizer_property_encoded_text(tok: Tokenizer, text: str, cut: tuple[int, int]) -> None:
    ids = tok.encode(text)
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids)
    if _representable(tok, text) and "\ufffd" not in text:
        assert "".join(deltas) == text and tail == ""
        assert all("\ufffd" not in d for d in deltas)
    # A slice starts and ends mid-character: the stream must still equal the full decode.
    start, stop = sorted(cut)
    piece = ids[start:stop]
    deltas, tail = _stream(tok, piece)
    assert "".join(deltas) + tail == tok.decode(piece)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 49151), max_size=30), skip=st.booleans())
def test_detokenizer_property_random_ids(tok: Tokenizer, ids: list[int], skip: bool) -> None:
    deltas, tail = _stream(tok, ids, skip)
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
