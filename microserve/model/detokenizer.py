"""Turns generated token ids into text one token at a time, never emitting a broken UTF-8 character.

Decodes only a short window of recent tokens per step (vLLM's prefix/read offsets), so each step is O(1).
"""

from __future__ import annotations

from microserve.model.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Streams the text of a growing token sequence; all deltas plus `flush()` equal the full decode.

    `prefix_offset..read_offset` are tokens already emitted, decoded again only as context: decoders
    such as sentencepiece's drop the leading space of whatever they decode first, so the new text is
    the difference between decoding the window with and without the new tokens.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far (a held-back incomplete character is not included)."""
        return "".join(self._parts)

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def add(self, token_id: int) -> str:
        """The text completed by this token; '' while a multi-byte character is still incomplete."""
        self._ids.append(token_id)
        prefix_text, new_text = self._decode_window()
        # A trailing U+FFFD is almost always half a character; wait for the bytes that complete it.
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        return self._emit(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """Whatever is held back, as the full decode renders it; call once the sequence has ended."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text, new_text = self._decode_window()
        return self._emit(new_text[len(prefix_text) :])

    def _decode_window(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset :]
        emitted = self._read_offset - self._prefix_offset
        decode = self._tokenizer.decode
        return decode(window[:emitted], self._skip), decode(window, self._skip)

    def _emit(self, delta: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if delta:
            self._parts.append(delta)
        return delta
