"""Policies pick one worker out of the candidates for a request; each is a small class behind `Policy`.

Candidates arrive filtered (model, role, health, circuit, draining) and in pool order; a policy only
ranks them. Picks are deterministic given the workers' state, a seeded `rng` and an injectable `clock`.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import xxhash

from microserve.router.prefix_index import PrefixIndex
from microserve.router.request import RoutedRequest
from microserve.router.workers import Worker


class Policy(ABC):
    name: ClassVar[str]
    needs_load: ClassVar[bool] = False  # the router polls /load (or /metrics) only while such a policy runs

    def __init__(self) -> None:
        self._turn = itertools.count()

    @property
    def needs_prompt_ids(self) -> bool:
        return False

    @abstractmethod
    def select(self, workers: Sequence[Worker], req: RoutedRequest) -> Worker:
        """One of `workers` (never empty) for `req`."""

    def options(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options()}

    def handed_off(self, src: str, dst: str, prefixes: Sequence[Sequence[int]]) -> None:
        """Worker `src` is leaving and `dst` now holds `prefixes` (token ids) from its cache (the
        autoscaler's prefix hand-off): a policy that remembers where prefixes are updates itself."""
        return None

    def _rotate(self, tied: Sequence[Worker]) -> Worker:
        # Ties go round robin, so that an idle fleet is not served by its first worker alone.
        return tied[next(self._turn) % len(tied)]


def _least(workers: Sequence[Worker], key: Callable[[Worker], Any], policy: Policy) -> Worker:
    best = min(key(w) for w in workers)
    return policy._rotate([w for w in workers if key(w) == best])


class RoundRobin(Policy):
    """Each pool (a candidate set, such as a model's prefill workers) takes turns on its own counter, so
    the prefill and the decode pick of one PD request do not split a single counter between them."""

    name = "round_robin"
    MAX_POOLS = 256  # candidate sets remembered; past that, start over (turns only need to spread)

    def __init__(self) -> None:
        super().__init__()
        self._turns: dict[tuple[str, ...], int] = {}

    def select(self, workers: Sequence[Worker], req: RoutedRequest) -> Worker:
        key = tuple([w.url for w in workers])  # a list first: one call, where a generator resumes per item
        turn = self._turns.get(key)
        if turn is None:
            if len(self._turns) >= self.MAX_POOLS:
                self._turns.clear()
            turn = 0
        self._turns[key] = turn + 1
        return workers[turn % len(workers)]


class Random(Policy):
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__()
        self._rng = rng or random.Random()

    def select(self, workers: Sequence[Worker], req: RoutedRequest) -> Worker:
        return workers[self._rng.randrange(len(workers))]


class LeastConnections(Policy):
    """Fewest requests in flight (from every router replica that shares state), counted at dispatch."""

    name = "least_connections"

    def select(self, workers: Sequence[Worker], req: RoutedRequest) -> Worker:
        return _least(workers, lambda w: w.fleet_in_flight, self)


class LeastLoaded(Policy):
    """Least engine-reported load: queued work, then KV use; falls back to in-flight counts when stale.

    A worker's queue is its reported `waiting + running` plus what this router sent since that report.
    A worker above `kv_high` KV use ranks after every other (it is about to preempt). If any candidate's
    report is older than `max_staleness_s` (or missing), all are compared by requests in flight instead,
    so one silent worker cannot look idle forever.
    """

    name = "least_loaded"
    needs_load = True

    def __init__(
        self, max_staleness_s: float = 2.0, kv_high: float = 0.9, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.max_staleness_s = max_staleness_s
        self.kv_high = kv_high
        self._clock = clock

    def options(self) -> dict[str, Any]:
        return {"max_staleness_s": self.max_staleness_s, "kv_high": self.kv_high}

    def select(self, workers: Sequence[Worker], req: RoutedRequest) -> Worker:
        now = self._clock()
        if all(w.load is not None and now - w.load.at <= self.max_staleness_s for w in workers):
            return _least(workers, self._score, self)
        return _least(workers, lambda w: w.fleet_in_flight, self)

    def _score(self, w: Worker) -> tuple[bool, int, float]:
        load = w.load
        assert load is not None
        return load.kv_usage >= self.kv_high, load.waiting + load.running + w.sent_since_report, load.kv_usage


class Weighted(Policy):
    """Weights through smooth weighted round robin (nginx's) or least connections per unit of weight."""

    name = "weighted"
    MODES = ("round_robin", "least_connections")

    def __init__(self, mode: str = "round_robin") -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"weighted mode must be one of {', '.join(self.MODES)}; got {mode!r}")
        self.mode = mode
        self._current: dict[str, int] = {}

    def options(self) -> dict[str, Any]:
        return {"mode": self.mode}

    def select(self, workers: Sequence[Worker], req: RoutedRequest) -> Worker:
        if self.mode == "least_connections":
            # Higher weight wins a tie in load: it has more room left.
            return _least(workers, lambda w: (w.fleet_in_flight / w.weight, -w.weight), self)
        total = 0
        best: Worker | None = None
        for w in workers:
            current = self._current.get(w.url, 0) + w.weight
            self._current[w.url] = current
            total += w.weight
            if best is None or current > self._current[best.url]:
                best = w
        assert best is not None
        self._current[best.url] -= total
        if len(self._current) > 2 * len(workers):  # forget workers that left
            live = {w.url for w in workers}
            self._current = {u: c for u, c in self._current.items() if u in live}
        return best


class ConsistentHash(Policy):
    """A hash ring with bounded load: a session sticks to its worker unless that one is over its share.

    The key is `X-Session-ID`, else the body's `user`; requests with neither go round robin. A worker
    is skipped (the walk goes on clockwise) while it has `load_factor` times its weighted share of the
    requests in flight or more, so one hot session cannot swamp a worker (Mirrokni et al., 2018).
    """

    name = "consistent_hash"

    def __init__(
        self,
        virtual_nodes: int = 64,
        load_factor: float = 1.25,
        hash_fn: Callable[[str], int] | None = None,
    ) -> None:
        super().__init__()
        if virtual_nodes < 1 or load_factor < 1.0:
            raise ValueError("need virtual_nodes >= 1 and load_factor >= 1")
        self.virtual_nodes = virtual_nodes
        self.load_factor = load_factor
        self._hash = hash_fn or _xxh64
        self._rings: dict[tuple[tuple[str, int], ...], tuple[list[int], list[str]]] = {}

    def options(self) -> dict[str, Any]:
        return {"virtual_nodes": self.virtual_nodes, "load_factor": self.load_factor}

    def _ring(self, workers: Sequence[Worker]) -> tuple[list[int], list[str]]:
        key = tuple((w.url, w.weight) for w in workers)
        ring = self._rings.get(key)
        if ring is None:
            points = sorted(
                (self._hash(f"{w.url}#{i}"), w.url)
                for w in workers
                for i in range(self.virtual_nodes * w.weight)
            )
            ring = ([p for p, _ in points], [u for _, u in points])
            if len(self._rings) >= 16:  # candidate sets change with health; keep the recent ones
                self._rings.clear()
            self._rings[key] = ring
        return ring

    def select(self, workers: Sequence[Worker], req: RoutedRequest) -> Worker:
        if req.session_key is None or len(workers) == 1:
            return workers[next(self._turn) % len(workers)]
        points, urls = self._ring(workers)
        by_url = {w.url: w for w in workers}
        total_weight = sum(w.weight for w in workers)
        in_flight = sum(w.fleet_in_flight for w in workers) + 1  # this request included

        def capacity(w: Worker) -> int:
            return math.ceil(self.load_factor * in_flight * w.weight / total_weight)

        start = bisect.bisect(points, self._hash(req.session_key))
        seen: set[str] = set()
        for i in range(len(points)):
            url = urls[(start + i) % len(points)]
            if url in seen:
                continue
            seen.add(url)
            worker = by_url[url]
            if worker.fleet_in_flight < capacity(worker):
                return worker
        return _least(workers, lambda w: w.fleet_in_flight / w.weight, self)  # only if capacities round down


def _xxh64(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode())


class PowerOfTwo(Policy):
    """Two random candidates, the less loaded wins (engine-reported queue when fresh, else in flight)."""

    name = "power_of_two"
    needs_load = True

    def __init__(
        self,
        rng: random.Random | None = None,
        max_staleness_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._rng = rng or random.Random()
        self.max_staleness_s = max_staleness_s
        self._clock = clock

    def options(self) -> dict[str, Any]:
        return {"max_staleness_s": self.max_staleness_s}

    def select(self, workers: Sequence[Worker], req: RoutedRequest) -> Worker:
        if len(workers) == 1:
            return workers[0]
        a, b = (workers[i] for i in self._rng.sample(range(len(workers)), 2))
        now = self._clock()
        fresh = all(w.load is not None and now - w.load.at <= self.max_staleness_s for w in (a, b))

        def load(w: Worker) -> int:
            if fresh:
                assert w.load is not None
                return w.load.waiting + w.load.running + w.sent_since_report
            return w.fleet_in_flight

        return b if load(b) < load(a) else a


class PrefixAware(Policy):
    """Send a prompt where its longest prefix was sent before, unless that worker is overloaded.

    A candidate with more than `balance_abs` requests in flight above the idlest and more than
    `balance_rel` times as many is overloaded: its cache wins it nothing. Among the others, the worker
    holding the longest matching prefix wins, but only if it holds at least `min_match` more characters
    (or tokens, with `tokens=True`) than every other one: a system prompt that all workers have seen does
    not decide, and one seen by a single worker decides only until that worker is overloaded. Else the
    least busy candidate wins. The index is bounded (`max_blocks`) and forgets least recently used.

    Overload is judged worker by worker, not fleet-wide, so one busy worker does not move the other
    workers' conversations off their caches; and the default `min_match` (128 characters, ~32 tokens)
    is shorter than a typical user turn, so a conversation's second turn stays with its first.
    """

    name = "prefix_aware"

    def __init__(
        self,
        min_match: int = 128,
        balance_abs: int = 3,
        balance_rel: float = 1.5,
        block_size: int | None = None,
        max_blocks: int = 65536,
        tokens: bool = False,
    ) -> None:
        super().__init__()
        if min_match < 1 or balance_abs < 0 or balance_rel < 1.0:
            raise ValueError("need min_match >= 1, balance_abs >= 0 and balance_rel >= 1")
        self.min_match = min_match
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.tokens = tokens
        # ~4 characters a token: the text blocks cover about as much as the engine's 16-token KV blocks.
        block = block_size if block_size is not None else (16 if tokens else 64)
        self.index = PrefixIndex(block_size=block, max_blocks=max_blocks)

    @property
    def needs_prompt_ids(self) -> bool:
        return self.tokens

    def options(self) -> dict[str, Any]:
        return {
            "min_match": self.min_match,
            "balance_abs": self.balance_abs,
            "balance_rel": self.balance_rel,
            "block_size": self.index.block_size,
            "max_blocks": self.index.max_blocks,
            "tokens": self.tokens,
        }

    def select(self, workers: Sequence[Worker], req: RoutedRequest) -> Worker:
        hashes = self.index.hashes(req.prompt_ids if self.tokens else req.prefix)
        chosen = self._choose(workers, hashes)
        self.index.insert(hashes, chosen.url)
        return chosen

    def handed_off(self, src: str, dst: str, prefixes: Sequence[Sequence[int]]) -> None:
        if self.tokens:  # the moved prefixes themselves
            for ids in prefixes:
                self.index.insert(self.index.hashes(ids), dst)
        elif prefixes:
            # A text index cannot name token ids: what `src` was sent goes to `dst`, which holds the
            # hottest of it now; the rest costs one cache miss there, as it would anywhere.
            self.index.reassign(src, dst)
        self.index.forget_worker(src)

    def _choose(self, workers: Sequence[Worker], hashes: list[int]) -> Worker:
        low = min(w.fleet_in_flight for w in workers)
        fit = [w for w in workers if not self._overloaded(w.fleet_in_flight, low)]  # the idlest always fits
        matched = self.index.match(hashes)
        blocks = sorted((matched.get(w.url, 0) for w in fit), reverse=True)
        best, runner_up = blocks[0], blocks[1] if len(blocks) > 1 else 0
        if (best - runner_up) * self.index.block_size >= self.min_match:
            return next(w for w in fit if matched.get(w.url, 0) == best)
        return _least(workers, lambda w: w.fleet_in_flight, self)

    def _overloaded(self, in_flight: int, low: int) -> bool:
        return in_flight - low > self.balance_abs and in_flight > low * self.balance_rel


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        Random,
        LeastConnections,
        LeastLoaded,
        Weighted,
        ConsistentHash,
        PowerOfTwo,
        PrefixAware,
    )
}

# Options a user may set by name (rng, clock and hash_fn are for tests).
_INTERNAL = {"rng", "clock", "hash_fn"}


def make_policy(name: str, options: dict[str, Any] | None = None) -> Policy:
    """A policy by name with keyword options; ValueError names what is wrong."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    options = dict(options or {})
    bad = sorted(set(options) & _INTERNAL)
    if bad:
        raise ValueError(f"option(s) {', '.join(bad)} cannot be set from outside")
    try:
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for policy {name}: {exc}") from None
