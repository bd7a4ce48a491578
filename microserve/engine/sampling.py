"""Per-request sampling parameters, validated once when the request arrives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microserve.engine.grammar import GrammarSpec

MAX_LOGPROBS = 20  # top logprobs a token may carry (vLLM's default max_logprobs)


class InvalidParams(ValueError):
    """A sampling parameter is out of range; the message names it and `param` is the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0  # drop tokens below min_p times the top token's probability
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1  # choices, sharing the prompt's KV (forked after its prefill)
    presence_penalty: float = 0.0  # OpenAI's: on logits, per distinct generated token
    frequency_penalty: float = 0.0  # OpenAI's: on logits, per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL's/vLLM's: logits of prompt and generated tokens divided (or x)
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the top k
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Tokens at the end of the prompt that were generated before (a continued stream): the penalties
    # and min_tokens count them as output, so a continuation samples as the first engine would have.
    num_prior_output_tokens: int = 0
    # A single-choice request that continues choice `choice_index` of an earlier n > 1 request: its
    # sequence samples as that choice did (the sim's words, the seed's offset).
    choice_index: int = 0
    priority: int = 0  # the scheduler admits lower values first, FCFS within one (vLLM's convention)
    grammar: GrammarSpec | None = None  # structured output: each token masked to what the grammar allows

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidParams(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidParams(f"temperature must be in [0, 2], got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParams(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise InvalidParams(f"top_k must be -1, 0 or positive, got {self.top_k}", "top_k")
        if self.top_k == -1:
            self.top_k = 0
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParams(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.min_tokens < 0:
            raise InvalidParams(f"min_tokens must be non-negative, got {self.min_tokens}", "min_tokens")
        if self.min_tokens > self.max_tokens:
            raise InvalidParams(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})", "min_tokens"
            )
        if any(not s for s in self.stop):
            raise InvalidParams("stop strings must be non-empty", "stop")
        if len(self.stop) > 16:
            raise InvalidParams("at most 16 stop strings are allowed", "stop")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidParams(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidParams(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}", "repetition_penalty"
            )
        for token, bias in self.logit_bias.items():
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise InvalidParams(
                    f"logit_bias needs token ids >= 0 and biases in [-100, 100], got {token}: {bias}",
                    "logit_bias",
                )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidParams(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}", name)
        if self.n < 1:
            raise InvalidParams(f"n must be at least 1, got {self.n}", "n")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain(self) -> bool:
        """No logits processing: bias, penalties or min_p (the greedy fast path needs none)."""
        return (
            not self.logit_bias
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
            and self.repetition_penalty == 1.0
            and self.min_p == 0.0
        )
