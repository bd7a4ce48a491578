"""The router's memory of its recent requests: a bounded ring of what each answered request did (status,
latencies, its way through the fleet), read by the /dashboard page and the per-verb metrics."""

from __future__ import annotations

import functools
import re
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

DEFAULT_SIZE = 2048
_MAX_NAMES = 256  # model names kept once each; past that (junk names) kept per request

# Engines put usage last in a whole answer; an escaped quote inside the text cannot match these.
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
_CACHED_TOKENS = re.compile(rb'"cached_tokens":\s*(\d+)')


@dataclass(slots=True, frozen=True)
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


@functools.lru_cache(maxsize=4096)
def plain_hop(verb: str, worker: str) -> Hop:
    """The one `Hop` for a call with nothing counted (a `generate`), shared by every request making it."""
    return Hop(verb, worker)


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
    never are, and a tuple is built without a Python call). It keeps as few objects of its own as it
    can: its number is its place in the ring, its model name the first request's string, its one plain
    hop the shared `plain_hop`. What 2,048 requests keep alive costs the router more than the work of
    keeping it (a ring that kept nothing was 2.6-3.9 us a request faster at 64 connections, for 1.5%
    fewer instructions; these three gave back ~1 us: docs/router-benchmark.md)."""

    __slots__ = ("_clock", "_names", "_ring", "_seq", "calls", "kv_bytes", "kv_tokens")

    def __init__(self, size: int = DEFAULT_SIZE, clock: Any = time.time) -> None:
        if size < 1:
            raise ValueError("the recent-request ring needs room for at least one request")
        self._ring: deque[tuple[Any, ...]] = deque(maxlen=size)
        self._seq = 0  # requests recorded: the newest is number `_seq`
        self._names: dict[str | None, str | None] = {None: None}
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
        names = self._names
        name = names.get(model, model)  # the first request's string, shared by those after it
        if name is model and model not in names and len(names) < _MAX_NAMES:
            names[model] = model
        self._ring.append(
            (
                self._clock(),
                route,
                name,
                strategy,
                status,
                stream,
                ttft_s,
                e2e_s,
                output_tokens,
                cached_tokens,
                hops[0] if len(hops) == 1 else tuple(hops),  # one (shared) `plain_hop` as itself
                usage,
            )
        )

    def _items(self) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """(seq, item) for the requests the ring holds, oldest first; the first recorded is 1."""
        return enumerate(self._ring, self._seq - len(self._ring) + 1)

    def latest(self, n: int) -> list[Finished]:
        """The newest `n` requests, newest first."""
        out: list[Finished] = []
        for offset, item in enumerate(reversed(self._ring)):
            if len(out) >= n:
                break
            out.append(_finished(self._seq - offset, item))
        return out

    def complete_since(self) -> float:
        """The time from which the ring holds every request that ended (-inf until it drops one)."""
        if self._seq > len(self._ring):  # one was dropped
            at: float = self._ring[0][0]  # (at, ...)
            return at
        return float("-inf")

    def window(self, window_s: float, now: float | None = None) -> list[Finished]:
        """Requests that ended in the last `window_s` seconds, oldest first (as far as the ring reaches)."""
        since = (self._clock() if now is None else now) - window_s
        return [_finished(seq, item) for seq, item in self._items() if item[0] >= since]


def _finished(seq: int, item: tuple[Any, ...]) -> Finished:
    at, route, model, strategy, status, stream, ttft_s, e2e_s, output, cached, hops, usage = item
    output, cached = token_counts(output, cached, usage)
    hops = (hops,) if isinstance(hops, Hop) else hops
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
