"""A user's JSONL trace as a workload: one `{"prompt"|"messages": ..., "output_len": n}` a line.

Every bad line is reported with its number; the trace is replayed in order, cycled if more are asked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from microserve.bench.workloads import BenchRequest, Endpoint, Message, Workload


class TraceError(ValueError):
    """A trace file with bad lines: the message names each (file:line: what is wrong)."""


@dataclass(frozen=True, slots=True)
class TraceEntry:
    output_len: int
    prompt: str | list[int] | None = None
    messages: tuple[Message, ...] | None = None


def _parse_trace_line(text: str) -> TraceEntry:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    output_len = obj.get("output_len")
    # bool is an int in Python; `true` is not a length.
    if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
        raise ValueError(f"output_len must be a positive integer, got {output_len!r}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise ValueError('expected exactly one of "prompt" and "messages"')
    if has_prompt:
        prompt = obj["prompt"]
        if isinstance(prompt, str) and prompt:
            return TraceEntry(output_len, prompt=prompt)
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
        ):
            return TraceEntry(output_len, prompt=prompt)
        raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f'messages[{i}] must be an object with string "role" and "content"')
    return TraceEntry(
        output_len, messages=tuple({"role": m["role"], "content": m["content"]} for m in messages)
    )


def parse_trace(lines: list[str], source: str = "trace", max_reported: int = 5) -> list[TraceEntry]:
    """Entries from JSONL lines (blank lines skipped); every bad line is reported, not just the first."""
    entries: list[TraceEntry] = []
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entries.append(_parse_trace_line(line))
        except ValueError as exc:
            problems.append(f"{source}:{number}: {exc}")
    if problems:
        shown = "; ".join(problems[:max_reported])
        more = len(problems) - max_reported
        raise TraceError(shown + (f"; and {more} more bad line(s)" if more > 0 else ""))
    if not entries:
        raise TraceError(f"{source}: no requests in the trace")
    return entries


@dataclass(frozen=True, slots=True)
class TraceWorkload(Workload):
    """A user's JSONL trace, one request a line, replayed in order (and cycled if more are asked)."""

    entries: tuple[TraceEntry, ...]
    path: str = ""
    name = "trace"

    @classmethod
    def load(cls, path: str | Path) -> TraceWorkload:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise TraceError(f"cannot read the trace {path}: {exc.strerror or exc}") from None
        return cls(tuple(parse_trace(text.splitlines(), source=str(path))), path=str(path))

    @property
    def endpoints(self) -> frozenset[Endpoint]:
        if any(isinstance(e.prompt, list) for e in self.entries):
            if any(e.messages is not None for e in self.entries):
                return frozenset()
            return frozenset({Endpoint.COMPLETIONS})
        if any(e.messages is not None for e in self.entries):
            return frozenset({Endpoint.CHAT})
        return frozenset(Endpoint)

    def check_endpoint(self, endpoint: Endpoint) -> None:
        if not self.endpoints:
            raise TraceError(
                f"{self.path}: token-id prompts need --endpoint completions and messages --endpoint chat; "
                "one trace cannot mix them"
            )
        Workload.check_endpoint(self, endpoint)

    @property
    def natural_count(self) -> int:
        return len(self.entries)

    def request(self, index: int) -> BenchRequest:
        e = self.entries[index % len(self.entries)]
        prompt_len = len(e.prompt) if isinstance(e.prompt, list) else None
        return BenchRequest(index, e.output_len, prompt=e.prompt, messages=e.messages, prompt_len=prompt_len)

    def for_run(self, run: int) -> TraceWorkload:
        # A replay is the same prompts every run: a later run of a sweep may find them in the prefix cache.
        return self

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "lines": len(self.entries)}
