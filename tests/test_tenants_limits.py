"""Limits on a virtual clock: requests and tokens per minute with OpenAI's headers, reservation and
settlement, the daily budget and requests at once; a refusal counts nothing."""

from __future__ import annotations

import pytest

from microserve.server.errors import APIError
from microserve.tenants.keys import KeyRecord
from microserve.tenants.limits import Limiter, duration
from microserve.tenants.store import MemoryStore
from tests.clocks import Clock


def limiter(clock: Clock) -> Limiter:
    return Limiter(MemoryStore(clock=clock), clock=clock)


def key(**limits: object) -> KeyRecord:
    return KeyRecord.create({"tenant": "t", **limits})[0]


def test_duration_reads_like_openai() -> None:
    assert [duration(s) for s in (0.02, 1.5, 40.0, 360.0)] == ["20ms", "1.5s", "40s", "6m0s"]


async def test_requests_per_minute_with_headers_then_a_new_window() -> None:
    clock = Clock(360_020.0)
    lim, record = limiter(clock), key(rpm=2)
    first = await lim.admit(record, 10)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "40s"
    await lim.admit(record, 10)
    with pytest.raises(APIError) as refused:
        await lim.admit(record, 10)
    err = refused.value
    assert err.status == 429 and err.code == "rate_limit_exceeded" and err.type == "rate_limit_error"
    assert err.headers["Retry-After"] == "40" and err.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now += 40
    assert (await lim.admit(record, 10)).headers["x-ratelimit-remaining-requests"] == "1"


async def test_tokens_are_reserved_then_settled_on_the_real_count() -> None:
    clock = Clock(360_020.0)
    lim, record = limiter(clock), key(tpm=100)
    grant = await lim.admit(record, 60)
    assert grant.headers["x-ratelimit-remaining-tokens"] == "40"
    with pytest.raises(APIError, match="tokens per minute"):
        await lim.admit(record, 60)  # 120 reserved would pass 100
    await lim.settle(grant, 15)  # the answer used 15: 45 back
    assert (await lim.admit(record, 60)).headers["x-ratelimit-remaining-tokens"] == "25"


async def test_a_request_larger_than_the_limit_is_refused_with_why() -> None:
    lim = limiter(Clock(360_020.0))
    with pytest.raises(APIError, match="Request too large"):
        await lim.admit(key(tpm=100, rpm=5), 101)
    assert lim.refused == {"tpm": 1}


async def test_daily_budget_and_a_refusal_that_counts_nothing() -> None:
    clock = Clock(360_020.0)
    lim, record = limiter(clock), key(daily_tokens=100, rpm=10)
    await lim.admit(record, 70)
    with pytest.raises(APIError, match="Daily token budget") as refused:
        await lim.admit(record, 40)
    assert int(refused.value.headers["Retry-After"]) > 3600
    # The refused request was not counted against the requests per minute either.
    assert (await lim.admit(record, 30)).headers["x-ratelimit-remaining-requests"] == "8"
    clock.now += 86_400
    await lim.admit(record, 100)


async def test_requests_at_once_are_freed_when_settled() -> None:
    lim, record = limiter(Clock(360_020.0)), key(max_concurrent=1)
    grant = await lim.admit(record, 1)
    with pytest.raises(APIError, match="at once"):
        await lim.admit(record, 1)
    await lim.settle(grant, None)
    await lim.admit(record, 1)
