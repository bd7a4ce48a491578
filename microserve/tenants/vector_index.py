"""Nearest-neighbour search for the semantic cache: unit vectors kept per namespace (a tenant, a model and
the rest of a request), searched by cosine similarity within one namespace only, bounded in size.

In process, a matrix per namespace; in Redis (replicas share it), a capped list per namespace, read
whole and searched here: a namespace holds at most `max_per_namespace` vectors, so a scan is bounded.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

KEY_CHARS = 64  # an answer's key: a sha256 in hex (`cache.cache_key`)
DEFAULT_PER_NAMESPACE = 1024
DEFAULT_MAX_VECTORS = 65536  # in process, over every namespace: 150 MB at 576 dimensions


class VectorIndex(Protocol):
    async def nearest(self, namespace: str, vector: np.ndarray) -> tuple[float, str] | None:
        """(cosine similarity, key) of the closest vector stored in `namespace`; None when empty."""
        ...

    async def add(self, namespace: str, vector: np.ndarray, key: str) -> None: ...

    async def close(self) -> None: ...


def best(matrix: np.ndarray, keys: list[str], vector: np.ndarray) -> tuple[float, str] | None:
    if not keys:
        return None
    scores = matrix @ vector
    i = int(np.argmax(scores))
    return float(scores[i]), keys[i]


@dataclass(slots=True)
class _Namespace:
    matrix: np.ndarray
    keys: list[str] = field(default_factory=list)


class MemoryIndex:
    """Per namespace the newest `max_per_namespace` vectors; over all, at most `max_vectors`, dropping
    the namespaces least recently searched first."""

    def __init__(
        self, max_per_namespace: int = DEFAULT_PER_NAMESPACE, max_vectors: int = DEFAULT_MAX_VECTORS
    ):
        self.max_per_namespace = max_per_namespace
        self.max_vectors = max_vectors
        self.size = 0
        self._spaces: OrderedDict[str, _Namespace] = OrderedDict()

    async def nearest(self, namespace: str, vector: np.ndarray) -> tuple[float, str] | None:
        space = self._spaces.get(namespace)
        if space is None or space.matrix.shape[1] != vector.shape[0]:
            return None
        self._spaces.move_to_end(namespace)
        return best(space.matrix, space.keys, vector)

    async def add(self, namespace: str, vector: np.ndarray, key: str) -> None:
        row = vector.astype(np.float32)[None, :]
        space = self._spaces.get(namespace)
        if space is None or space.matrix.shape[1] != row.shape[1]:
            self.size -= 0 if space is None else len(space.keys)
            self._spaces[namespace] = _Namespace(row, [key])
            self.size += 1
        else:
            before = len(space.keys)
            space.matrix = np.concatenate([space.matrix, row])[-self.max_per_namespace :]
            space.keys = [*space.keys, key][-self.max_per_namespace :]
            self.size += len(space.keys) - before
        self._spaces.move_to_end(namespace)
        while self.size > self.max_vectors and len(self._spaces) > 1:
            _, dropped = self._spaces.popitem(last=False)
            self.size -= len(dropped.keys)

    async def close(self) -> None:
        pass


class RedisIndex:
    """Each namespace a Redis list, newest first, trimmed to `max_per_namespace` entries and expiring
    `ttl_s` after its last addition; an entry is the answer's key followed by the float32 vector."""

    def __init__(
        self,
        url: str,
        ttl_s: float,
        max_per_namespace: int = DEFAULT_PER_NAMESPACE,
        prefix: str = "microserve:semantic:",
    ) -> None:
        import redis.asyncio as aioredis  # only a router given Redis needs the client

        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.max_per_namespace = max_per_namespace
        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    async def nearest(self, namespace: str, vector: np.ndarray) -> tuple[float, str] | None:
        entries = await self._redis.lrange(self.prefix + namespace, 0, self.max_per_namespace - 1)
        width = KEY_CHARS + 4 * vector.shape[0]
        rows = [e for e in entries if isinstance(e, bytes) and len(e) == width]
        if not rows:
            return None
        keys = [e[:KEY_CHARS].decode("ascii") for e in rows]
        matrix = np.frombuffer(b"".join(e[KEY_CHARS:] for e in rows), dtype="<f4").reshape(len(rows), -1)
        return best(matrix, keys, vector.astype(np.float32))

    async def add(self, namespace: str, vector: np.ndarray, key: str) -> None:
        if len(key) != KEY_CHARS:
            raise ValueError(f"an answer key has {KEY_CHARS} characters")
        name = self.prefix + namespace
        entry = key.encode("ascii") + vector.astype("<f4").tobytes()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.lpush(name, entry)
            pipe.ltrim(name, 0, self.max_per_namespace - 1)
            pipe.pexpire(name, self.ttl_ms)
            await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()
