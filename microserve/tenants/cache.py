"""The exact response cache: a deterministic request (temperature 0, or a seed) of one tenant is answered
again from what it got before, whole answers as they were and streams replayed event by event.

Keyed on the tenant, the route and the request in canonical form (sorted JSON without the fields that do
not change the answer), so no tenant can read another's answers. Only complete answers are kept: a
stream that ended with `data: [DONE]` (one cut short or ended by an error event never does).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson

from microserve.http.limits import MiB

log = logging.getLogger(__name__)

CACHE_HEADER = "x-microserve-cache"
# Fields that never change the answer (who asked, what to store): left out of the key.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})
DONE = b"data: [DONE]\n\n"
WHOLE, STREAM = b"J", b"S"  # the first byte of a stored answer


def cacheable(body: Mapping[str, Any]) -> bool:
    """Only an answer the same request would get again: greedy (temperature 0) or seeded sampling."""
    if body.get("seed") is not None:
        return True
    temperature = body.get("temperature", 1.0)  # OpenAI's default
    return isinstance(temperature, int | float) and temperature == 0


def cache_key(tenant: str, route: str, body: Mapping[str, Any]) -> str:
    canonical = orjson.dumps(
        {k: v for k, v in body.items() if k not in IGNORED_FIELDS}, option=orjson.OPT_SORT_KEYS
    )
    h = hashlib.sha256(tenant.encode())
    h.update(b"\0" + route.encode() + b"\0")
    h.update(canonical)
    return h.hexdigest()


def no_cache(headers: Mapping[str, str]) -> bool:
    return "no-cache" in headers.get("cache-control", "").lower()


def stream_events(stored: bytes) -> list[bytes]:
    """A stored stream as the SSE events it was sent as."""
    return [event + b"\n\n" for event in stored.split(b"\n\n") if event]


class CacheBackend(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> None: ...

    async def close(self) -> None: ...


class MemoryCache:
    """LRU under a byte bound, each entry dropped `ttl_s` after it was stored."""

    def __init__(
        self, max_bytes: int = 256 * MiB, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self.size = 0
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= self.clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[0]

    async def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (value, self.clock() + self.ttl_s)
        self.size += len(value)
        while self.size > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self.size -= len(value)

    async def close(self) -> None:
        pass


class RedisCache:
    """Entries with Redis's own expiry; the size bound is the server's (`maxmemory` with an LRU policy)."""

    def __init__(self, url: str, ttl_s: float = 3600.0, prefix: str = "microserve:cache:") -> None:
        import redis.asyncio as aioredis  # only a router given Redis needs the client

        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    async def get(self, key: str) -> bytes | None:
        value = await self._redis.get(self.prefix + key)
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes) -> None:
        await self._redis.set(self.prefix + key, value, px=self.ttl_ms)

    async def close(self) -> None:
        await self._redis.aclose()


class ResponseCache:
    """What dispatch asks: `lookup` before routing, `store` once an answer completed."""

    def __init__(self, backend: CacheBackend) -> None:
        self.backend = backend
        self.hits = 0
        self.misses = 0

    @classmethod
    def open(cls, source: str, ttl_s: float, max_bytes: int) -> ResponseCache:
        if source == "memory":
            return cls(MemoryCache(max_bytes, ttl_s))
        if source.startswith(("redis://", "rediss://", "unix://")):
            return cls(RedisCache(source, ttl_s))
        raise ValueError(f"--response-cache takes memory or redis://…, not {source!r}")

    async def lookup(
        self, tenant: str, route: str, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> tuple[str | None, bytes | None]:
        """(the key to store the answer under, or None if not cacheable; the stored answer on a hit)."""
        if not cacheable(body):
            return None, None
        key = cache_key(tenant, route, body)
        stored = None
        if not no_cache(headers):  # no-cache: answer afresh (and keep the fresh answer)
            try:
                stored = await self.backend.get(key)
            except Exception as exc:  # a cache that is down is a miss, never a failed request
                log.warning("response cache: lookup failed: %s", exc)
        if stored is None:
            self.misses += 1
        else:
            self.hits += 1
        return key, stored

    async def store(self, key: str, stream: bool, answer: bytes) -> bool:
        """Keep a complete answer before the answer ends, so the client's next request finds it; False
        when it was not kept."""
        if stream and not answer.endswith(DONE):
            return False  # cut short, or ended by an error event
        try:
            await self.backend.put(key, (STREAM if stream else WHOLE) + answer)
        except Exception as exc:
            log.warning("response cache: store failed: %s", exc)
            return False
        return True

    async def close(self) -> None:
        await self.backend.close()
