"""How many tokens an answer used, read from what the router forwards: the `usage` object when the answer
carries one, else (a stream without `stream_options.include_usage`) one token per content chunk."""

from __future__ import annotations

import re

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_CHOICE_CHUNK = re.compile(rb'"finish_reason"')  # every streamed choice carries one (null until the end)


def usage_total(body: bytes) -> int | None:
    """prompt + completion tokens from an answer's (or a chunk's) usage object, if it has one."""
    start = body.rfind(b'"usage"')
    if start < 0:
        return None
    tail = body[start:]
    prompt, completion = _PROMPT.search(tail), _COMPLETION.search(tail)
    if prompt is None or completion is None:
        return None
    return int(prompt.group(1)) + int(completion.group(1))


class StreamMeter:
    """Fed each streamed chunk; `total(prompt_estimate)` once the stream ended."""

    __slots__ = ("chunks", "usage")

    def __init__(self) -> None:
        self.chunks = 0
        self.usage: int | None = None

    def observe(self, chunk: bytes) -> None:
        if b'"usage"' in chunk:
            found = usage_total(chunk)
            if found is not None:
                self.usage = found
        self.chunks += len(_CHOICE_CHUNK.findall(chunk))

    def total(self, prompt_estimate: int) -> int:
        return self.usage if self.usage is not None else prompt_estimate + self.chunks
