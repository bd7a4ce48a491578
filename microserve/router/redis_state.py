"""Router replicas in step through Redis: one pipelined round trip a tick (20 ms), never on a request's way.

Each tick a replica appends what it learned since the last one (prefix-index inserts, circuits it opened
or closed) to one Redis stream, writes its requests in flight per worker to a hash that expires, and
reads back the others' stream entries and hashes. A new replica replays the stream, so it starts with
the fleet's index. While Redis cannot be reached the replica routes on its own state (degraded), keeps
what it learns meanwhile (bounded), and publishes it when Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from microserve.router.breaker import CircuitState
from microserve.router.policies import Policy
from microserve.router.prefix_index import PrefixIndex
from microserve.router.shared_state import Mode, SharedState
from microserve.router.workers import WorkerPool

# What a failed call to the shared store raises (the router's other Redis users catch the same).
STORE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

log = logging.getLogger(__name__)

TICK_S = 0.02  # staleness bound of what other replicas learned, plus one round trip
RETRY_S = 0.5  # between attempts while Redis is unreachable
CLOSE_S = 2.0  # each step of closing
IN_FLIGHT_TTL_MS = 2000  # a replica that stops (killed) stops counting after this long
STREAM_MAX = 20_000  # stream entries kept (about one a tick a replica): what a new replica replays
READ_MAX = 2_000  # entries read a tick
PENDING_MAX = 20_000  # inserts kept while Redis is unreachable, newest first to survive
WARN_EVERY_S = 10.0
CIRCUIT_EVENT_MAX_AGE_S = 5.0  # older circuit events (a replay) are not applied


class RedisState(SharedState):
    """Keys under `prefix`: `events` (stream), `in_flight:<replica>` (hash url -> count, expiring),
    `replicas` (sorted set replica -> last tick, wall clock)."""

    def __init__(self, url: str, prefix: str = "microserve:router:", tick_s: float = TICK_S) -> None:
        self.url = url
        self.prefix = prefix
        self.tick_s = tick_s
        self.replica = uuid.uuid4().hex[:12]
        # One pool for the router's Redis needs (the tenants' store may take `client` too).
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True
        )
        self.mode = Mode.DEGRADED  # until the first tick answers
        self._pool: Callable[[], WorkerPool] | None = None
        self._policy: Callable[[], Policy] | None = None
        self._index: PrefixIndex | None = None
        self._inserts: deque[tuple[str, Sequence[int]]] = deque(maxlen=PENDING_MAX)  # (url, hashes)
        self._opened: dict[str, float] = {}  # url -> seconds open, to publish
        self._closed: set[str] = set()
        # (state, openings) as last seen, to notice local changes: a failed half-open trial reopens a
        # circuit between two ticks, which only its count of openings shows.
        self._circuits: dict[str, tuple[CircuitState, int]] = {}
        self._last_id = "0"  # replay the stream on start
        self._others: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._warned = 0.0
        self.round_trips: deque[float] = deque(maxlen=4096)  # seconds, for the benchmark and /ready
        self.published = 0  # prefix inserts sent to the others
        self.learned = 0  # prefix inserts learned from the others

    @property
    def replicas(self) -> int:
        return len(self._others) + 1

    def bind(self, pool: Callable[[], WorkerPool], policy: Callable[[], Policy]) -> None:
        self._pool, self._policy = pool, policy

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="shared-state")

    async def close(self) -> None:
        """Stop the loop, leave the replica set, close the client; each step bounded by CLOSE_S. The loop's
        cancelled round trip was seen to wait forever inside redis-py 8.1 (a router's stop hung in a test,
        about once in fifteen runs): then the client's close, which ends it, comes after CLOSE_S."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_S)
        with contextlib.suppress(*STORE_ERRORS):  # TimeoutError among them
            async with asyncio.timeout(CLOSE_S):
                await self.client.delete(self._key(f"in_flight:{self.replica}"))
                await self.client.zrem(self._key("replicas"), self.replica)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_S):
                await self.client.aclose()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=CLOSE_S)
            if not self._task.done():
                log.warning("shared state: the Redis loop did not end on close; left to the process's end")
            elif not self._task.cancelled():
                self._task.exception()  # retrieved, as gather(return_exceptions=True) did before

    def describe(self) -> dict[str, Any]:
        trips = sorted(self.round_trips)
        p50 = round(trips[len(trips) // 2] * 1000, 3) if trips else None
        return {
            **super().describe(),
            "replica": self.replica,
            "sync_round_trip_p50_ms": p50,
            "prefixes_published": self.published,
            "prefixes_learned": self.learned,
        }

    def _key(self, name: str) -> str:
        return self.prefix + name

    # -- the hot path's only part: note an insert ------------------------------------------------------

    def _on_insert(self, hashes: Sequence[int], url: str) -> None:
        self._inserts.append((url, hashes))  # packed off the hot path, at the next tick

    # -- the loop ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
            except STORE_ERRORS as exc:
                self._degrade(exc)
                await asyncio.sleep(RETRY_S)
                continue
            await asyncio.sleep(self.tick_s)

    async def sync(self) -> None:
        """One tick: publish what changed here, read what changed elsewhere (one pipelined round trip)."""
        self._watch_index()
        self._note_circuits()
        inserts, opened, closed = list(self._inserts), dict(self._opened), set(self._closed)
        others = list(self._others)
        counts = self._local_counts()
        now_ms = int(time.time() * 1000)
        events = self._key("events")
        mine = self._key(f"in_flight:{self.replica}")
        replicas = self._key("replicas")
        started = time.perf_counter()
        async with self.client.pipeline(transaction=False) as pipe:
            if inserts or opened or closed:
                packed = [(url, pack(hashes)) for url, hashes in inserts]
                entry = {"r": self.replica, "p": packed, "o": list(opened.items()), "c": sorted(closed)}
                pipe.xadd(events, {"d": orjson.dumps(entry)}, maxlen=STREAM_MAX, approximate=True)
            pipe.delete(mine)
            if counts:
                pipe.hset(mine, mapping=counts)
                pipe.pexpire(mine, IN_FLIGHT_TTL_MS)
            pipe.zadd(replicas, {self.replica: now_ms})
            pipe.zremrangebyscore(replicas, 0, now_ms - IN_FLIGHT_TTL_MS)
            pipe.zrange(replicas, 0, -1)
            pipe.xread({events: self._last_id}, count=READ_MAX)
            for other in others:
                pipe.hgetall(self._key(f"in_flight:{other}"))
            results = await pipe.execute()
        self.round_trips.append(time.perf_counter() - started)
        # Published: drop what was sent (more may have arrived while the round trip ran).
        for _ in range(len(inserts)):
            self._inserts.popleft()
        self.published += len(inserts)
        for url in opened:
            self._opened.pop(url, None)
        self._closed -= closed
        n = len(others)
        self._apply_loads(results[len(results) - n :] if n else [])
        self._apply_events(results[-n - 1])
        self._others = [r for r in results[-n - 2] if r != self.replica]
        if self.mode is not Mode.SHARED:
            log.info("shared state: in step through Redis (%d replicas seen)", self.replicas)
            self.mode = Mode.SHARED

    def _degrade(self, exc: BaseException) -> None:
        if self.mode is Mode.SHARED:
            log.warning("shared state: Redis unreachable (%r); routing on local state", exc)
            self._warned = time.monotonic()
        elif time.monotonic() - self._warned > WARN_EVERY_S:
            log.warning("shared state: Redis still unreachable (%r); routing on local state", exc)
            self._warned = time.monotonic()
        self.mode = Mode.DEGRADED
        # Others' counts would only grow stale: forget them until Redis answers again.
        for worker in self._workers():
            worker.remote_in_flight = 0
        self._others = []

    # -- what this replica publishes ---------------------------------------------------------------

    def _workers(self) -> list[Any]:
        return [] if self._pool is None else list(self._pool())

    def _watch_index(self) -> None:
        """Listen to the current policy's prefix index (a policy swapped at run time brings a new one)."""
        policy = self._policy() if self._policy is not None else None
        index = getattr(policy, "index", None)
        if index is self._index:
            return
        if self._index is not None:
            self._index.on_insert = None
        self._index = index if isinstance(index, PrefixIndex) else None
        if self._index is not None:
            self._index.on_insert = self._on_insert
            self._last_id = "0"  # a new index (a policy swapped in) learns the fleet's history too

    def _note_circuits(self) -> None:
        for worker in self._workers():
            breaker = worker.breaker
            state, openings = breaker.state, breaker.openings
            before, opened_before = self._circuits.get(worker.url, (CircuitState.CLOSED, 0))
            if state is CircuitState.OPEN and openings != opened_before:
                self._opened[worker.url] = breaker.open_remaining_s()
                self._closed.discard(worker.url)
            elif state is CircuitState.CLOSED and before is not CircuitState.CLOSED:
                self._closed.add(worker.url)
                self._opened.pop(worker.url, None)
            self._circuits[worker.url] = (state, openings)

    def _local_counts(self) -> dict[Any, Any]:  # redis-py's mapping type is invariant in its keys
        return {w.url: w.in_flight for w in self._workers() if w.in_flight > 0}

    # -- what the others published -----------------------------------------------------------------

    def _apply_loads(self, loads: Sequence[dict[str, str]]) -> None:
        totals: dict[str, int] = {}
        for counts in loads:
            for url, n in counts.items():
                totals[url] = totals.get(url, 0) + int(n)
        for worker in self._workers():
            worker.remote_in_flight = totals.get(worker.url, 0)

    def _apply_events(self, stream: Any) -> None:
        if not stream:
            return
        pool = self._pool() if self._pool is not None else None
        now_ms = time.time() * 1000
        for _name, entries in stream:
            for entry_id, fields in entries:
                self._last_id = entry_id
                age_s = max(0.0, now_ms - int(entry_id.split("-")[0])) / 1000  # ids are Redis's ms clock
                try:
                    event = orjson.loads(fields["d"])
                except (KeyError, orjson.JSONDecodeError):
                    continue
                if event.get("r") == self.replica:
                    continue
                if self._index is not None:
                    for url, packed in event.get("p", ()):
                        self._index.learn(unpack(packed), url)
                        self.learned += 1
                if pool is None or age_s > CIRCUIT_EVENT_MAX_AGE_S:
                    continue  # replayed history: prefixes only, circuits have moved on since
                for url, seconds in event.get("o", ()):
                    if url in pool and seconds - age_s > 0:
                        breaker = pool.get(url).breaker
                        breaker.open_for(seconds - age_s)
                        self._circuits[url] = (CircuitState.OPEN, breaker.openings)
                for url in event.get("c", ()):
                    if url in pool:
                        breaker = pool.get(url).breaker
                        breaker.on_success()
                        self._circuits[url] = (CircuitState.CLOSED, breaker.openings)


def pack(hashes: Sequence[int]) -> str:
    """Block hashes as one hex string (16 digits each): compact, and safe in a decoded Redis reply."""
    return "".join(f"{h:016x}" for h in hashes)


def unpack(text: str) -> list[int]:
    return [int(text[i : i + 16], 16) for i in range(0, len(text), 16)]
