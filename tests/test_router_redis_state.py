"""RedisState over a real redis-server: two replicas in one process, each with its own pool and policy,
synchronised tick by tick (`sync`) or by their background loops; Redis killed and started again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from microserve.router.breaker import BreakerConfig, CircuitState
from microserve.router.policies import PrefixAware
from microserve.router.redis_state import RedisState, pack, unpack
from microserve.router.request import Route, RoutedRequest
from microserve.router.shared_state import Mode
from microserve.router.workers import WorkerPool, WorkerSpec
from tests.redis_server import RedisServer

URLS = ["http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"]


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.kill()


class Replica:
    """What a router gives its shared state: a pool and a prefix_aware policy."""

    def __init__(self, url: str) -> None:
        self.now = 0.0  # the circuits' clock
        self.pool = WorkerPool(BreakerConfig(failure_threshold=1, open_s=30.0), clock=lambda: self.now)
        for u in URLS:
            self.pool.add(WorkerSpec(u, models=("m",)))
        self.policy = PrefixAware(min_match=64)
        self.state = RedisState(url, tick_s=0.01)
        self.state.bind(lambda: self.pool, lambda: self.policy)

    def pick(self, prompt: str) -> str:
        req = RoutedRequest.parse(Route.COMPLETIONS, b'{"model":"m","prompt":"%s"}' % prompt.encode())
        return self.policy.select(self.pool.candidates("m"), req).url


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_hashes_pack_and_unpack() -> None:
    hashes = [0, 1, 2**64 - 1, 0xDEADBEEF]
    assert unpack(pack(hashes)) == hashes


async def test_replicas_share_prefixes_loads_and_circuits(redis: RedisServer) -> None:
    a, b = Replica(redis.url), Replica(redis.url)
    try:
        for r in (a, b):
            await r.state.sync()  # each sees the other from its second tick
        await a.state.sync()
        assert a.state.mode is Mode.SHARED and a.state.replicas == 2

        # A prefix that A sent to a worker goes to the same worker through B.
        prompt = "You are a helpful assistant. " * 10
        first = a.pick(prompt + "Question one?")
        a.pool.get(first).acquire()  # in flight on A: without sharing, B would avoid it as the busiest
        await a.state.sync()
        await b.state.sync()
        assert b.pool.get(first).remote_in_flight == 1 and b.pool.get(first).in_flight == 0
        assert b.pick(prompt + "Question two?") == first

        # A circuit opened on A is open on B, then closed on both.
        a.pool.get(URLS[2]).record_failure("http_500")
        await a.state.sync()
        await b.state.sync()
        assert b.pool.get(URLS[2]).breaker.state is CircuitState.OPEN
        assert 29.0 < b.pool.get(URLS[2]).breaker.open_remaining_s() <= 30.0
        a.pool.get(URLS[2]).record_success()
        await a.state.sync()
        await b.state.sync()
        assert b.pool.get(URLS[2]).breaker.state is CircuitState.CLOSED
        await b.state.sync()
        await a.state.sync()  # B applied A's close: it does not echo it back as its own change
        assert a.pool.get(URLS[2]).breaker.state is CircuitState.CLOSED

        # A failed half-open trial reopens the circuit for twice as long, between two ticks: shared too.
        a.pool.get(URLS[2]).record_failure("http_500")
        await a.state.sync()
        await b.state.sync()
        a.now += 31.0  # half-open on A
        a.pool.get(URLS[2]).acquire()
        a.pool.get(URLS[2]).record_failure("http_500")
        assert a.pool.get(URLS[2]).breaker.open_remaining_s() == 60.0
        await a.state.sync()
        await b.state.sync()
        assert 59.0 < b.pool.get(URLS[2]).breaker.open_remaining_s() <= 60.0

        # A replica that stops takes its loads with it.
        await a.state.close()
        await b.state.sync()
        await b.state.sync()
        assert b.pool.get(first).remote_in_flight == 0 and b.state.replicas == 1
    finally:
        await a.state.close()
        await b.state.close()


async def test_a_new_replica_replays_what_the_fleet_learned(redis: RedisServer) -> None:
    a = Replica(redis.url)
    prompt = "Shared system prompt, long enough to decide. " * 6
    chosen = a.pick(prompt + "turn 1")
    await a.state.sync()
    late = Replica(redis.url)  # started after the insert: learns it from the stream
    try:
        await late.state.sync()
        assert late.pick(prompt + "turn 2") == chosen
    finally:
        await a.state.close()
        await late.state.close()


@pytest.mark.slow
async def test_redis_down_degrades_then_resynchronises(redis: RedisServer) -> None:
    a, b = Replica(redis.url), Replica(redis.url)
    await a.state.start()
    await b.state.start()
    try:
        await until(lambda: a.state.mode is Mode.SHARED and b.state.replicas == 2)
        a.pool.get(URLS[0]).acquire()
        await until(lambda: b.pool.get(URLS[0]).remote_in_flight == 1)

        redis.kill()
        await until(lambda: a.state.mode is Mode.DEGRADED and b.state.mode is Mode.DEGRADED)
        assert b.pool.get(URLS[0]).remote_in_flight == 0  # stale counts are dropped, not trusted
        prompt = "Learned while Redis was away, by replica A alone. " * 4
        chosen = a.pick(prompt + "first")  # routing goes on, on local state

        redis.start()  # empty: what A learned meanwhile is published again
        await until(lambda: a.state.mode is Mode.SHARED and b.state.mode is Mode.SHARED)
        await until(lambda: b.pool.get(URLS[0]).remote_in_flight == 1)
        await until(lambda: bool(b.policy.index.match(b.policy.index.hashes(prompt))))
        assert b.pick(prompt + "second") == chosen
    finally:
        await a.state.close()
        await b.state.close()
