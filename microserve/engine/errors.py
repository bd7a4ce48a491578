"""Exceptions the engine raises to its callers (the HTTP layer maps each to a status code).

They live apart from the engine so that the server and test doubles can import them without the engine.
"""

from __future__ import annotations


class EngineOverloaded(Exception):
    """The engine's waiting queue is full; the caller should retry later (HTTP 503)."""


class PromptTooLong(ValueError):
    """The prompt (with max_tokens) does not fit the model's context; the message states both (HTTP 400).

    `by_itself`: the prompt alone fills the context (blame the prompt, not max_tokens)."""

    def __init__(self, message: str, by_itself: bool = True) -> None:
        super().__init__(message)
        self.by_itself = by_itself


class EngineDead(RuntimeError):
    """The engine loop crashed; no request can make progress until the process restarts (HTTP 503)."""


class EmbeddingsUnsupported(ValueError):
    """This engine's backend computes no hidden states (the sim backend models time, not values)."""
