"""Keys and limit counters in Redis, shared by every router replica: a key revoked on one is refused by all
at the next request, and a limit counts the requests of all replicas together."""

from __future__ import annotations

import math

import orjson
import redis.asyncio as aioredis

from microserve.tenants.keys import KeyRecord


class RedisStore:
    """`{prefix}key:<digest>` holds a key's record (one GET a request); `{prefix}key_ids`: id -> digest."""

    def __init__(self, url: str, prefix: str = "microserve:") -> None:
        self.url = url
        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True
        )

    def _key(self, key_hash: str) -> str:
        return f"{self.prefix}key:{key_hash}"

    async def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        raw = await self._redis.get(self._key(key_hash))
        return None if raw is None else KeyRecord.from_dict(orjson.loads(raw))

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        key_hash = await self._redis.hget(f"{self.prefix}key_ids", key_id)
        return None if key_hash is None else await self.key_by_hash(str(key_hash))

    async def keys(self) -> list[KeyRecord]:
        hashes = await self._redis.hvals(f"{self.prefix}key_ids")
        if not hashes:
            return []
        raws = await self._redis.mget([self._key(str(h)) for h in hashes])
        return [KeyRecord.from_dict(orjson.loads(r)) for r in raws if r is not None]

    async def put_key(self, record: KeyRecord) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(record.key_hash), orjson.dumps(record.to_dict()))
            pipe.hset(f"{self.prefix}key_ids", record.id, record.key_hash)
            await pipe.execute()

    async def delete_key(self, key_id: str) -> bool:
        key_hash = await self._redis.hget(f"{self.prefix}key_ids", key_id)
        if key_hash is None:
            return False
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(str(key_hash)))
            pipe.hdel(f"{self.prefix}key_ids", key_id)
            await pipe.execute()
        return True

    async def add(self, counter: str, amount: int, ttl_s: float) -> int:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(f"{self.prefix}n:{counter}", amount)
            pipe.expire(f"{self.prefix}n:{counter}", max(1, math.ceil(ttl_s)), nx=True)
            value, _ = await pipe.execute()
        return int(value)

    async def close(self) -> None:
        await self._redis.aclose()
