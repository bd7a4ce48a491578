"""Keys and limit counters in Redis, shared by every router replica: a key revoked on one is refused by all
at the next request, and a limit counts the requests of all replicas together.

While Redis cannot be reached no request fails for it: a key seen before is served from this replica's
copy, and limits count in this replica alone (each replica then allows the whole limit); changing keys
answers 503 until Redis is back."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from microserve.tenants.keys import KeyRecord
from microserve.tenants.store import MemoryStore

log = logging.getLogger(__name__)

KNOWN_KEYS = 10_000  # records kept for when Redis is down
WARN_EVERY_S = 10.0


class StoreUnavailable(OSError):
    """The shared store cannot be reached to change keys."""


class RedisStore:
    """`{prefix}key:<digest>` holds a key's record (one GET a request); `{prefix}key_ids`: id -> digest."""

    def __init__(self, url: str, prefix: str = "microserve:", client: aioredis.Redis | None = None) -> None:
        """`client`: one the router already holds for this Redis (it must decode responses), shared."""
        self.url = url
        self.prefix = prefix
        self._owns_client = client is None
        self._redis = client or aioredis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True
        )
        self._known: OrderedDict[str, KeyRecord] = OrderedDict()  # digest -> record, as last read
        self._local = MemoryStore()  # counters while Redis is down
        self._warned = 0.0

    def _down(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned > WARN_EVERY_S:
            self._warned = now
            log.warning("tenants: Redis unreachable (%s); keys seen before and local limits serve", exc)

    def _key(self, key_hash: str) -> str:
        return f"{self.prefix}key:{key_hash}"

    async def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        try:
            raw = await self._redis.get(self._key(key_hash))
        except (RedisError, OSError) as exc:
            self._down(exc)
            return self._known.get(key_hash)
        if raw is None:
            self._known.pop(key_hash, None)
            return None
        record = KeyRecord.from_dict(orjson.loads(raw))
        self._known[key_hash] = record
        self._known.move_to_end(key_hash)
        if len(self._known) > KNOWN_KEYS:
            self._known.popitem(last=False)
        return record

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        try:
            key_hash = await self._redis.hget(f"{self.prefix}key_ids", key_id)
            raw = None if key_hash is None else await self._redis.get(self._key(str(key_hash)))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"the key store (Redis) cannot be reached: {exc}") from None
        return None if raw is None else KeyRecord.from_dict(orjson.loads(raw))

    async def keys(self) -> list[KeyRecord]:
        try:
            hashes = await self._redis.hvals(f"{self.prefix}key_ids")
            raws = await self._redis.mget([self._key(str(h)) for h in hashes]) if hashes else []
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"the key store (Redis) cannot be reached: {exc}") from None
        return [KeyRecord.from_dict(orjson.loads(r)) for r in raws if r is not None]

    async def put_key(self, record: KeyRecord) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key(record.key_hash), orjson.dumps(record.to_dict()))
                pipe.hset(f"{self.prefix}key_ids", record.id, record.key_hash)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"the key store (Redis) cannot be reached: {exc}") from None

    async def delete_key(self, key_id: str) -> bool:
        try:
            key_hash = await self._redis.hget(f"{self.prefix}key_ids", key_id)
            if key_hash is None:
                return False
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(str(key_hash)))
                pipe.hdel(f"{self.prefix}key_ids", key_id)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"the key store (Redis) cannot be reached: {exc}") from None
        self._known.pop(str(key_hash), None)
        return True

    async def add(self, counter: str, amount: int, ttl_s: float) -> int:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incrby(f"{self.prefix}n:{counter}", amount)
                pipe.expire(f"{self.prefix}n:{counter}", max(1, math.ceil(ttl_s)), nx=True)
                value, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._down(exc)
            return await self._local.add(counter, amount, ttl_s)
        return int(value)

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()
