"""Text <-> token ids and chat prompts for a model, from GGUF metadata or a Hugging Face folder.

Wraps a `tokenizers.Tokenizer` and renders the model's chat template exactly as `transformers` does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from microserve.model.chat_template import ChatTemplate, ChatTemplateError

log = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token_type values

# Pre-tokenizer splits by llama.cpp's `tokenizer.ggml.pre` name; they decide which merges can ever apply.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "tekken": _TEKKEN_SPLIT,
}
_GPT2_PRES = ("default", "gpt2", "gpt-2")
RELEASE_GIL_CHARS = 16 * 1024  # above this, tokenize without holding the GIL (about 5 ms of work)


class Tokenizer:
    """A model's tokenizer: special token ids, encode/decode and chat template rendering."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token: str,
        bos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self._backend = backend
        # Templates see these by name (`{{ bos_token }}`), as transformers passes its special_tokens_map.
        self._special = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "unk_token": unk_token,
            "pad_token": pad_token,
        }
        self._chat_template = chat_template
        self._template: ChatTemplate | None = None  # compiled on first use
        self._max_token_chars: int | None = None  # computed on first use
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"eos token {eos_token!r} is not in the vocabulary")
        self._eos_id = eos_id
        self._eos_ids = frozenset({eos_id, *extra_eos_ids})

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a .gguf file or a Hugging Face folder."""
        path = Path(path)
        return cls.from_hf_folder(path) if path.is_dir() else cls.from_gguf(path)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """From the vocabulary, merges and special token ids in a GGUF file's metadata."""
        import gguf

        reader = gguf.GGUFReader(Path(path))

        def get(key: str, default: Any = None) -> Any:
            field = reader.fields.get(key)
            return default if field is None else field.contents()

        model = get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2'); "
                "load the model from a Hugging Face folder with tokenizer.json instead"
            )
        tokens: list[str] = get("tokenizer.ggml.tokens")
        backend = _byte_level_bpe(tokens, get("tokenizer.ggml.merges", []), get("tokenizer.ggml.pre"))
        _add_gguf_added_tokens(backend, tokens, get("tokenizer.ggml.token_type", []))

        def token(key: str) -> str | None:
            token_id = get(f"tokenizer.ggml.{key}")
            return None if token_id is None else tokens[token_id]

        bos, eos = token("bos_token_id"), token("eos_token_id")
        if eos is None:
            raise ValueError("GGUF metadata lacks tokenizer.ggml.eos_token_id")
        add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
        add_eos = bool(get("tokenizer.ggml.add_eos_token", False))
        backend.post_processor = _post_processor(backend, bos if add_bos else None, eos if add_eos else None)
        # llama.cpp ends generation on any end-of-generation token, not only on EOS.
        extra = [get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        return cls(
            backend,
            eos_token=eos,
            bos_token=bos,
            unk_token=token("unknown_token_id"),
            pad_token=token("padding_token_id"),
            chat_template=get("tokenizer.chat_template"),
            extra_eos_ids=[i for i in extra if i is not None],
        )

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """From tokenizer.json, tokenizer_config.json and (when present) generation_config.json."""
        path = Path(path)
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")
        model_config = _read_json(path / "config.json")
        eos = _token_content(config.get("eos_token"))
        if eos is None:
            eos_ids = _as_ids(generation.get("eos_token_id", model_config.get("eos_token_id")))
            if not eos_ids:
                raise ValueError(f"{path} names no eos token in tokenizer_config.json or config files")
            eos = backend.id_to_token(eos_ids[0])
            if eos is None:
                raise ValueError(f"{path}: eos token id {eos_ids[0]} is not in the tokenizer's vocabulary")
        return cls(
            backend,
            eos_token=eos,
            bos_token=_token_content(config.get("bos_token")),
            unk_token=_token_content(config.get("unk_token")),
            pad_token=_token_content(config.get("pad_token")),
            chat_template=_hf_chat_template(path, config),
            extra_eos_ids=_as_ids(generation.get("eos_token_id")),
        )

    # --- vocabulary --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        bos = self._special["bos_token"]
        return None if bos is None else self._backend.token_to_id(bos)

    @property
    def eos_token_id(self) -> int:
        return self._eos_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends a generation: EOS plus the model's other end-of-turn ids."""
        return self._eos_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    @property
    def max_token_chars(self) -> int:
        """The most characters one token's text has: no text of n characters is fewer than
        n / max_token_chars tokens, so an over-long prompt is known before it is tokenized."""
        if self._max_token_chars is None:
            vocab = self._backend.get_vocab(with_added_tokens=True)
            self._max_token_chars = max((len(token) for token in vocab), default=1)
        return self._max_token_chars

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; BOS/EOS are added only when the model asks for them."""
        if len(text) > RELEASE_GIL_CHARS:
            # Same ids; encode_batch lets go of the GIL while it works, encode does not, so a long
            # prompt tokenized on a worker thread would stall the event loop for its whole length.
            return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- chat template -----------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for a conversation, byte-identical to transformers' rendering."""
        if not self._chat_template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions with a raw prompt")
        if self._template is None:
            self._template = ChatTemplate(self._chat_template)
        special = {k: v for k, v in self._special.items() if v is not None}
        return self._template.render(messages, add_generation_prompt, tools, {**special, **kwargs})


# --- GGUF vocabulary -------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _merge_pair(merge: str) -> tuple[str, str]:
    """A GGUF merge, "left right", as the pair tokenizers' BPE takes."""
    left, space, right = merge.partition(" ")
    if not space:
        raise ValueError(f"BPE merge {merge!r} is not two tokens separated by a space")
    return left, right


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> tokenizers.Tokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Some converters store a few tokens as raw text; respell them in the byte alphabet the merges use.
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    pairs = [_merge_pair(m) for m in merges]
    backend = tokenizers.Tokenizer(
        BPE(vocab=vocab, merges=pairs, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre == "smollm":
        # llama.cpp's smollm pre-tokenizer isolates every digit before the GPT-2 split, as SmolLM's
        # tokenizer.json does; transformers' GGUF loader skips this step.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in _PRE_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in _GPT2_PRES and pre is not None:
        log.warning("unknown GGUF pre-tokenizer %r; splitting text the GPT-2 way", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def _add_gguf_added_tokens(backend: tokenizers.Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens become special (never split, skippable); user-defined ones plain added tokens."""
    alphabet = set(_bytes_to_unicode().values())
    # A control token outside the byte alphabet is a converter mislabel; adding it would grow the vocab.
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, token_types, strict=True)
        if kind == _CONTROL and set(t) <= alphabet
    ]
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, token_types, strict=True)
        if kind == _USER_DEFINED and backend.token_to_id(t) is not None
    ]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _post_processor(
    backend: tokenizers.Tokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, special_tokens=specials)


# --- Hugging Face folder ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_content(token: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as a serialized AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _hf_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    # Newer transformers save the template beside the config instead of inside it.
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template
