"""The router's memory of its recent requests: a bounded ring of what each answered request did (status,
latencies, its way through the fleet), read by the /dashboard page and the per-verb metrics."""

from __future__ import annotations

import re
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

DEFAULT_SIZE = 2048

# Engines put usage last in a whole answer; an escaped quote inside the text cannot match these.
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
_CACHED_TOKENS = re.compile(rb'"cached_tokens":\s*(\d+)')


@dataclass(slots=True)
class Hop:
    """One call a strategy made on a worker for a request: a verb on a worker, and what it moved.

    `tokens`: for prep_recv the prompt tokens the worker already held (matched), for remote_send the
    tokens whose KV it sent; `nbytes`: the KV bytes remote_send moved.
    """

    verb: str
    worker: str
    tokens: int | None = None
    nbytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"verb": self.verb, "worker": self.worker}
        if self.tokens is not None:
            out["tokens"] = self.tokens
        if self.nbytes is not None:
            out["bytes"] = self.nbytes
        return out


@dataclass(slots=True)
class Finished:
    """One request as it ended. `ttft_s` is None when no answer was sent (an error before the first byte);
    token counts are None when the router did not see them (an untracked stream without usage)."""

    seq: int
    at: float  # wall clock at the end
    route: str
    model: str | None
    strategy: str
    status: int
    stream: bool
    ttft_s: float | None
    e2e_s: float
    output_tokens: int | None
    cached_tokens: int | None
    hops: tuple[Hop, ...]

    @property
    def tpot_s(self) -> float | None:
        """Seconds per output token after the first, for a stream whose tokens the router counted."""
        if not self.stream or self.ttft_s is None or self.output_tokens is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "route": self.route,
            "model": self.model,
            "strategy": self.strategy,
            "status": self.status,
            "stream": self.stream,
            "ttft_s": self.ttft_s,
            "e2e_s": self.e2e_s,
            "tpot_s": self.tpot_s,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "hops": [h.to_dict() for h in self.hops],
        }


class RecentRequests:
    """The last `size` requests, newest last, plus running tallies of calls per (worker, verb) and KV
    sent per worker. Appending is all the hot path does: a deque with a bound, no lock (one event loop).
    Each request is kept as the tuple of its `Finished` fields, made a `Finished` only when read (most
    never are, and a tuple is built without a Python call)."""

    __slots__ = ("_clock", "_ring", "_seq", "calls", "kv_bytes", "kv_tokens")

    def __init__(self, size: int = DEFAULT_SIZE, clock: Any = time.time) -> None:
        if size < 1:
            raise ValueError("the recent-request ring needs room for at least one request")
        self._ring: deque[tuple[Any, ...]] = deque(maxlen=size)
        self._seq = 0
        self._clock = clock
        self.calls: Counter[tuple[str, str]] = Counter()
        self.kv_bytes: Counter[str] = Counter()
        self.kv_tokens: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._ring)

    def record(
        self,
        route: str,
        model: str | None,
        strategy: str,
        status: int,
        stream: bool,
        ttft_s: float | None,
        e2e_s: float,
        output_tokens: int | None = None,
        cached_tokens: int | None = None,
        hops: list[Hop] | tuple[Hop, ...] = (),
        usage: bytes | None = None,
    ) -> None:
        """`usage`: a whole answer's usage as the worker sent it, read for the token counts only when
        the request is (see `token_counts`)."""
        self._seq += 1
        for hop in hops:
            self.calls[(hop.worker, hop.verb)] += 1
            if hop.nbytes is not None:
                self.kv_bytes[hop.worker] += hop.nbytes
                self.kv_tokens[hop.worker] += hop.tokens or 0
        self._ring.append(
            (
                self._seq,
                self._clock(),
                route,
                model,
                strategy,
                status,
                stream,
                ttft_s,
                e2e_s,
                output_tokens,
                cached_tokens,
                tuple(hops),
                usage,
            )
        )

    def latest(self, n: int) -> list[Finished]:
        """The newest `n` requests, newest first."""
        out: list[Finished] = []
        for item in reversed(self._ring):
            if len(out) >= n:
                break
            out.append(_finished(item))
        return out

    def complete_since(self) -> float:
        """The time from which the ring holds every request that ended (-inf until it drops one)."""
        if self._ring and self._ring[0][0] > 1:  # (seq, at, ...)
            at: float = self._ring[0][1]
            return at
        return float("-inf")

    def window(self, window_s: float, now: float | None = None) -> list[Finished]:
        """Requests that ended in the last `window_s` seconds, oldest first (as far as the ring reaches)."""
        since = (self._clock() if now is None else now) - window_s
        return [_finished(item) for item in self._ring if item[1] >= since]


def _finished(item: tuple[Any, ...]) -> Finished:
    seq, at, route, model, strategy, status, stream, ttft_s, e2e_s, output, cached, hops, usage = item
    output, cached = token_counts(output, cached, usage)
    return Finished(seq, at, route, model, strategy, status, stream, ttft_s, e2e_s, output, cached, hops)


def token_counts(
    output_tokens: int | None, cached_tokens: int | None, usage: bytes | None
) -> tuple[int | None, int | None]:
    """(completion_tokens, cached_tokens): from a whole answer's usage when there is one, else the
    counts a stream's relay made."""
    if usage is not None:
        return usage_tokens(usage)
    return output_tokens, cached_tokens


def usage_of(body: bytes) -> bytes | None:
    """A whole OpenAI answer's usage object as sent (engines put it last), or None: kept, and parsed
    only if someone reads it."""
    start = body.rfind(b'"usage"')
    return None if start < 0 else body[start:]


def usage_tokens(body: bytes) -> tuple[int | None, int | None]:
    """(completion_tokens, cached_tokens) from a whole OpenAI answer's usage, without parsing it all."""
    start = body.rfind(b'"usage"')
    if start < 0:
        return None, None
    tail = body[start:]
    completion = _COMPLETION_TOKENS.search(tail)
    cached = _CACHED_TOKENS.search(tail)
    return (
        int(completion.group(1)) if completion else None,
        int(cached.group(1)) if cached else None,
    )
