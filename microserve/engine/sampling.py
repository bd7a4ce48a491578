"""Per-request sampling parameters, validated once when the request arrives."""

from __future__ import annotations

from dataclasses import dataclass, field


class InvalidParams(ValueError):
    """A sampling parameter is out of range; the message names it."""


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    priority: int = 0  # the scheduler admits lower values first, FCFS within one (vLLM's convention)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidParams(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidParams(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParams(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidParams(f"top_k must be -1, 0 or positive, got {self.top_k}")
        if self.top_k == -1:
            self.top_k = 0
        if self.min_tokens < 0:
            raise InvalidParams(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise InvalidParams(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if any(not s for s in self.stop):
            raise InvalidParams("stop strings must be non-empty")
        if len(self.stop) > 16:
            raise InvalidParams("at most 16 stop strings are allowed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
