"""What the engine hands back to the API layer for one request, one step at a time."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FinishReason(StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens, or the model's context is full
    ABORT = "abort"  # cancelled by the client or the server


@dataclass(slots=True, frozen=True)
class Timeline:
    """When a request's phases happened in the engine (`time.monotonic()`), handed out with its last
    output so that traces can show queue wait, prefill and decode without a hook in the step loop."""

    arrival: float
    scheduled: float | None  # its first prefill chunk ran; None if it never ran
    first_token: float | None
    finished: float
    prefill_chunks: int  # chunks of prompt computed, recomputes after preemption included
    cached_tokens: int
    preemptions: int


@dataclass(slots=True)
class TokenLogprobs:
    """A token's log-probability under the model (before any sampling processing) and the top ones."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first
    rank: int = 1  # 1 + how many tokens were more likely


@dataclass(slots=True)
class RequestOutput:
    """One increment of one choice of a request's generation.

    `text` is the new, complete-UTF-8 text since the previous output (stop strings already cut off
    unless the request keeps them); `token_ids` are the new token ids, `logprobs` theirs when asked.
    Counts are cumulative. `index` is the choice (0 to n-1); `stop_reason` the stop string or stop
    token id that ended it (None for EOS or length).
    """

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    index: int = 0
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # first output only
    stop_reason: str | int | None = None
    timeline: Timeline | None = None  # on the finished output only


@dataclass(slots=True)
class KVPiece:
    """One exported KV payload, for tokens [begin, end)."""

    begin: int
    end: int
    data: memoryview  # a view of the payload, not a copy

    @property
    def num_tokens(self) -> int:
        return self.end - self.begin


@dataclass(slots=True)
class PrefillProgress:
    """KV computed for another engine since the last progress, exported in pieces (maybe none yet)."""

    request_id: str
    payloads: list[KVPiece]
    finished: bool
    exported_at: float = 0.0  # time.monotonic() when exporting `payloads` began
    export_s: float = 0.0  # and how long it took
    timeline: Timeline | None = None  # on the finished progress only
