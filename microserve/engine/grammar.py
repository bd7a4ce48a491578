"""Grammar-constrained decoding (structured output) with llguidance: what a request asks the answer to
match (`GrammarSpec`), compiled once per (tokenizer, grammar), and a matcher per sequence that masks
its logits each step and advances on the sampled token.

Why llguidance (docs/grammar.md has the measurements): no dependencies, JSON schema, regex, choices,
Lark and GBNF in one library, grammars validated without a tokenizer (the API's 400 names the field),
and a per-token mask that stays well under a decode step. Masks are applied to logits by
microserve/runner/grammar_mask.py.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import llguidance

from microserve.engine.sampling import InvalidParams

if TYPE_CHECKING:  # the router imports the spec: no numpy there
    import numpy as np
    from llguidance._lib import JsonCompileOptions

GrammarKind = Literal["json_schema", "regex", "choice", "grammar"]
# Separators as a model usually writes JSON, and no free whitespace: a small model left free to emit
# whitespace may never close the object. A schema's own "x-guidance" options override this.
_JSON_DEFAULTS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What the answer must match. `source`: a JSON schema (as JSON text), a regex, a JSON list of
    choices, or a Lark / GBNF grammar. `param` is the request field it came from (errors name it)."""

    kind: GrammarKind
    source: str
    param: str = field(default="response_format", compare=False)

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool, param: str = "response_format") -> GrammarSpec:
        if not isinstance(schema, dict | bool):
            raise InvalidParams(f"{param} must be a JSON schema (an object)", param)
        return cls("json_schema", json.dumps(schema), param)

    @classmethod
    def json_object(cls, param: str = "response_format") -> GrammarSpec:
        return cls.json_schema(ANY_JSON_OBJECT, param)

    @classmethod
    def regex(cls, pattern: str, param: str = "guided_regex") -> GrammarSpec:
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, choices: list[str], param: str = "guided_choice") -> GrammarSpec:
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise InvalidParams(f"{param} must be a non-empty list of non-empty strings", param)
        return cls("choice", json.dumps(choices), param)

    @classmethod
    def grammar(cls, text: str, param: str = "guided_grammar") -> GrammarSpec:
        """A Lark grammar (llguidance's syntax) or a GBNF one (llama.cpp's, `root ::= ...`)."""
        return cls("grammar", text, param)

    def to_llguidance(self) -> str:
        """llguidance's grammar text; InvalidParams (naming `param`) if it cannot be converted."""
        try:
            if self.kind == "json_schema":
                return str(
                    llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=_JSON_DEFAULTS)
                )
            return str(llguidance.grammar_from(self.kind, self.source))
        except ValueError as exc:
            raise InvalidParams(f"{self.param}: {_first_line(str(exc))}", self.param) from None

    def check(self) -> None:
        """Raise InvalidParams naming `param` unless the grammar is valid (no tokenizer needed)."""
        error = llguidance.LLMatcher.validate_grammar(self.to_llguidance())
        if error:
            raise InvalidParams(
                f"{self.param} is not a valid {_NAMES[self.kind]}: {_first_line(error)}", self.param
            )


_NAMES = {
    "json_schema": "JSON schema",
    "regex": "regular expression",
    "choice": "choice list",
    "grammar": "grammar",
}


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else message


class GrammarMatcher:
    """One sequence's place in its grammar: which tokens may come next, and whether it has ended."""

    __slots__ = ("_m", "words")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._m = matcher
        self.words = (vocab_size + 31) // 32  # int32 words in its bitmask row

    def accept(self, token: int) -> bool:
        """Advance over a sampled token; False (and the matcher is failed) if the grammar forbids it."""
        return bool(self._m.consume_token(token))

    def advance(self, tokens: list[int]) -> bool:
        """Advance over tokens generated before (a continued stream); False if they do not match."""
        return bool(self._m.consume_tokens(tokens)) if tokens else True

    @property
    def terminated(self) -> bool:
        """The grammar is complete and allows nothing more (or has failed): the sequence ends here."""
        return bool(self._m.is_stopped() or self._m.is_error())

    @property
    def llguidance_matcher(self) -> llguidance.LLMatcher:
        return self._m

    @property
    def error(self) -> str:
        return str(self._m.get_error())

    def fill_bitmask(self, row: np.ndarray[Any, Any]) -> None:
        """Write the allowed tokens as bits (bit t % 32 of word t // 32) into one int32 row."""
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)


class GrammarCompiler:
    """Compiled grammars for one tokenizer, least recently used dropped past `capacity`. A matcher is a
    copy of the compiled grammar's start state: compiling (ms for a schema) happens once per grammar."""

    def __init__(
        self, tokenizer_json: str, eos_token_ids: list[int], vocab_size: int, capacity: int = 256
    ) -> None:
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_ids)
        self.vocab_size = vocab_size
        self.capacity = capacity
        self._compiled: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int | None = None) -> GrammarCompiler:
        """From microserve's Tokenizer (its `tokenizers` backend and EOS ids)."""
        return cls(
            tokenizer.backend.to_str(), sorted(tokenizer.eos_token_ids), vocab_size or tokenizer.vocab_size
        )

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher at the grammar's start; InvalidParams (naming the field) for a bad grammar."""
        compiled = self._compiled.get(spec)
        if compiled is None:
            compiled = llguidance.LLMatcher(self.tokenizer, spec.to_llguidance(), log_level=0)
            if compiled.is_error():
                message = _first_line(compiled.get_error())
                raise InvalidParams(f"{spec.param} is not a valid {_NAMES[spec.kind]}: {message}", spec.param)
            self._compiled[spec] = compiled
            if len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(spec)
        return GrammarMatcher(compiled.deep_copy(), self.tokenizer.vocab_size)
