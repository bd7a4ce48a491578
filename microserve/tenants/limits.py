"""Per-key limits: requests and tokens per minute, a daily token budget and requests at once, counted in
fixed windows of the wall clock in a `TenantStore` (so every replica sharing it counts together).

Tokens are reserved up front (the prompt's estimate plus `max_tokens`) and settled on the real count when
the answer ends; a request is refused with OpenAI's 429 and `x-ratelimit-*` headers when it would pass a
limit. The clock is a parameter: the simulator drives the same logic on its virtual time.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from microserve.api.errors import APIError
from microserve.tenants.keys import KeyRecord
from microserve.tenants.store import TenantStore

MINUTE_S = 60.0
DAY_S = 86_400.0
# How long a counter of requests at once outlives its last change: a replica that died holding slots
# frees them after this, at the latest.
CONCURRENCY_TTL_S = 3_600.0


@dataclass(slots=True)
class Grant:
    """A request let through: what it reserved (to settle later) and the headers its answer carries."""

    record: KeyRecord
    reserved: int
    minute: int
    day: int
    concurrent: bool  # holds a slot of max_concurrent
    headers: dict[str, str] = field(default_factory=dict)


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def rate_limited(message: str, retry_after_s: float, headers: dict[str, str]) -> APIError:
    return APIError(
        429,
        message,
        type="rate_limit_error",  # as OpenAI sends it (the admission queue's 429 uses it too)
        code="rate_limit_exceeded",
        headers={**headers, "Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )


class Limiter:
    def __init__(self, store: TenantStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.refused: Counter[str] = Counter()  # by limit: rpm, tpm, daily_tokens, max_concurrent

    async def admit(self, record: KeyRecord, reserve_tokens: int) -> Grant:
        """Count the request against every limit of its key; raise the 429 of the first it would pass
        (undoing what it counted)."""
        now = self.clock()
        minute, day = int(now // MINUTE_S), int(now // DAY_S)
        reset_minute = (minute + 1) * MINUTE_S - now
        grant = Grant(record, reserve_tokens, minute, day, concurrent=False)
        undo: list[tuple[str, int, float]] = []
        checking = "rpm"  # the limit being checked, for the refusal tally
        try:
            if record.rpm is not None:
                used = await self._take(undo, f"rpm:{record.id}:{minute}", 1, 2 * MINUTE_S)
                if _per_minute(grant, "requests", record.rpm, used, reset_minute):
                    raise rate_limited(
                        f"Rate limit reached for requests per minute (limit {record.rpm}); "
                        f"retry in {duration(reset_minute)}.",
                        reset_minute,
                        grant.headers,
                    )
            checking = "tpm"
            if record.tpm is not None:
                name = f"tpm:{record.id}:{minute}"
                if reserve_tokens > record.tpm:
                    raise rate_limited(
                        f"Request too large: it may use {reserve_tokens} tokens (prompt + max_tokens), "
                        f"more than the limit of {record.tpm} tokens per minute; lower max_tokens.",
                        reset_minute,
                        grant.headers,
                    )
                used = await self._take(undo, name, reserve_tokens, 2 * MINUTE_S)
                if _per_minute(grant, "tokens", record.tpm, used, reset_minute):
                    raise rate_limited(
                        f"Rate limit reached for tokens per minute (limit {record.tpm}, this request "
                        f"reserves {reserve_tokens}); retry in {duration(reset_minute)}.",
                        reset_minute,
                        grant.headers,
                    )
            checking = "daily_tokens"
            if record.daily_tokens is not None:
                used = await self._take(undo, f"day:{record.id}:{day}", reserve_tokens, 2 * DAY_S)
                if used > record.daily_tokens:
                    reset_day = (day + 1) * DAY_S - now
                    raise rate_limited(
                        f"Daily token budget reached (limit {record.daily_tokens} tokens a day, this "
                        f"request reserves {reserve_tokens}); it renews in {duration(reset_day)}.",
                        reset_day,
                        grant.headers,
                    )
            checking = "max_concurrent"
            if record.max_concurrent is not None:
                running = await self._take(undo, f"conc:{record.id}", 1, CONCURRENCY_TTL_S)
                if running > record.max_concurrent:
                    raise rate_limited(
                        f"Too many requests at once for this key (limit {record.max_concurrent}); "
                        "retry when one has finished.",
                        1,
                        grant.headers,
                    )
                grant.concurrent = True
        except APIError:
            self.refused[checking] += 1
            for name, amount, ttl in undo:
                await self.store.add(name, amount, ttl)
            raise
        return grant

    async def _take(self, undo: list[tuple[str, int, float]], name: str, amount: int, ttl: float) -> int:
        """Add `amount` to the counter `name` (noting how to undo it); its new value."""
        used = await self.store.add(name, amount, ttl)
        undo.append((name, -amount, ttl))
        return used

    async def settle(self, grant: Grant, used_tokens: int | None) -> None:
        """The request ended: charge its real token count instead of the reservation (when known) and
        free its slot."""
        record = grant.record
        if used_tokens is not None and used_tokens != grant.reserved:
            diff = used_tokens - grant.reserved
            if record.tpm is not None:
                await self.store.add(f"tpm:{record.id}:{grant.minute}", diff, 2 * MINUTE_S)
            if record.daily_tokens is not None:
                await self.store.add(f"day:{record.id}:{grant.day}", diff, 2 * DAY_S)
        if grant.concurrent:
            await self.store.add(f"conc:{record.id}", -1, CONCURRENCY_TTL_S)


def _per_minute(grant: Grant, what: str, limit: int, used: int, reset_s: float) -> bool:
    """Set the window's `x-ratelimit-*` headers on `grant`; whether `used` passed `limit`."""
    remaining = limit - used
    grant.headers.update(_trio(what, limit, max(0, remaining), reset_s))
    return remaining < 0


def _trio(what: str, limit: int, remaining: int, reset_s: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{what}": str(limit),
        f"x-ratelimit-remaining-{what}": str(remaining),
        f"x-ratelimit-reset-{what}": duration(reset_s),
    }
