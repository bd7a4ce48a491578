"""Where keys and limit counters live: `TenantStore` is the interface, `MemoryStore` the in-process default
(keys optionally kept in a JSON file), `redis_store.RedisStore` the one several router replicas share."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import orjson

from microserve.tenants.keys import KeyRecord, digest


class TenantStore(Protocol):
    async def key_by_hash(self, key_hash: str) -> KeyRecord | None: ...

    async def key_by_id(self, key_id: str) -> KeyRecord | None: ...

    async def keys(self) -> list[KeyRecord]: ...

    async def put_key(self, record: KeyRecord) -> None: ...

    async def delete_key(self, key_id: str) -> bool: ...

    async def add(self, counter: str, amount: int, ttl_s: float) -> int:
        """Add `amount` to `counter` (made at 0, expiring `ttl_s` after it was made); the new value."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """Keys in a dict (and in `path`, rewritten whole on each change, if given); counters in a dict."""

    def __init__(self, path: str | Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path) if path is not None else None
        self.clock = clock
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_id: dict[str, KeyRecord] = {}
        self._counters: dict[str, tuple[int, float]] = {}  # name -> (value, expires at)
        if self.path is not None and self.path.exists():
            for record in load_keys_file(self.path):
                self._index(record)

    def _index(self, record: KeyRecord) -> None:
        old = self._by_id.get(record.id)
        if old is not None:
            self._by_hash.pop(old.key_hash, None)
        self._by_id[record.id] = record
        self._by_hash[record.key_hash] = record

    async def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        return self._by_hash.get(key_hash)

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        return self._by_id.get(key_id)

    async def keys(self) -> list[KeyRecord]:
        return list(self._by_id.values())

    async def put_key(self, record: KeyRecord) -> None:
        self._index(record)
        self._save()

    async def delete_key(self, key_id: str) -> bool:
        record = self._by_id.pop(key_id, None)
        if record is None:
            return False
        self._by_hash.pop(record.key_hash, None)
        self._save()
        return True

    async def add(self, counter: str, amount: int, ttl_s: float) -> int:
        now = self.clock()
        value, expires = self._counters.get(counter, (0, now + ttl_s))
        if expires <= now:
            value, expires = 0, now + ttl_s
        value += amount
        self._counters[counter] = (value, expires)
        if len(self._counters) > 4096 and len(self._counters) % 1024 == 0:
            self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
        return value

    async def close(self) -> None:
        pass

    def _save(self) -> None:
        if self.path is None:
            return
        data = orjson.dumps({"keys": [r.to_dict() for r in self._by_id.values()]}, option=orjson.OPT_INDENT_2)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # digests only, still private
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)


def load_keys_file(path: Path) -> list[KeyRecord]:
    """Keys from a JSON file `{"keys": [...]}`; an entry may give `key` (a secret, hashed now) for
    `key_hash`, so an operator can write a file by hand."""
    try:
        data = orjson.loads(path.read_bytes())
        entries = data["keys"]
        records = []
        for entry in entries:
            entry = dict(entry)
            if "key" in entry:
                entry["key_hash"] = digest(entry.pop("key"))
            records.append(KeyRecord.from_dict(entry))
        return records
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f'{path}: not a keys file ({{"keys": [...]}}): {exc}') from None
