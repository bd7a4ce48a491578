"""A request inside the engine: its tokens, its place in the KV cache and its lifecycle."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from microserve.engine.outputs import FinishReason, TokenLogprobs
from microserve.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from microserve.engine.grammar import GrammarMatcher


class SequenceStatus(IntEnum):
    """Ordered so that `status >= FINISHED_STOPPED` means finished."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4

    @property
    def finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: FinishReason.STOP,
    SequenceStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    SequenceStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass(slots=True, eq=False)
class Sequence:
    """Prompt plus generated tokens. `num_computed_tokens` of them have their KV in `block_table`."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full, computed blocks
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    num_preemptions: int = 0
    prefill_only: bool = False  # compute KV for another engine: never sample
    index: int = 0  # which of the request's n choices
    grammar: GrammarMatcher | None = None  # structured output: where this choice is in its grammar
    # Filled by the runner when the params ask: one entry per sampled token, and per prompt token.
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    # For traces: when its prefill first ran, when its first token came, how many chunks the prefill took.
    scheduled_time: float | None = None
    first_token_time: float | None = None
    num_prefill_chunks: int = 0

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def output_token_ids(self) -> list[int]:
        """What the penalties and min_tokens count as generated: a continued stream's earlier tokens too."""
        return self.token_ids[self.num_prompt_tokens - self.params.num_prior_output_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def samples_after(self, num_new_tokens: int) -> bool:
        """Whether computing `num_new_tokens` more yields a token: they reach the end of the known
        tokens, and this is not a prefill computed only to send its KV to another engine."""
        return self.num_computed_tokens + num_new_tokens == self.num_tokens and not self.prefill_only
