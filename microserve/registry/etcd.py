"""A small etcd v3 client over etcd's JSON gateway (`/v3/kv/*`, `/v3/lease/*`, `/v3/watch`): the few calls
membership needs, on aiohttp, with no protobuf or gRPC stubs to keep in step with the server's version.

Keys and values travel base64-encoded, as the gateway wants; 64-bit numbers arrive as JSON strings.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

DEFAULT_PREFIX = "/microserve"


class EtcdError(ConnectionError):
    """etcd could not be reached, or answered with an error."""


@dataclass(slots=True, frozen=True)
class EtcdTarget:
    """`etcd://HOST:PORT[,HOST:PORT…][/prefix]`: the endpoints to try in turn and the key prefix."""

    endpoints: tuple[str, ...]
    prefix: str = DEFAULT_PREFIX

    @classmethod
    def parse(cls, url: str) -> EtcdTarget:
        parts = urlsplit(url)
        if parts.scheme != "etcd" or not parts.netloc:
            raise ValueError(f"an etcd registry looks like etcd://HOST:PORT[/prefix], got {url!r}")
        endpoints = []
        for hostport in parts.netloc.split(","):
            host, sep, port = hostport.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"each etcd endpoint needs HOST:PORT, got {hostport!r} in {url!r}")
            endpoints.append(f"http://{hostport}")
        prefix = parts.path.rstrip("/") or DEFAULT_PREFIX
        return cls(tuple(endpoints), prefix)

    @property
    def workers_prefix(self) -> str:
        """The keys engines register under: `<prefix>/workers/<advertised URL, quoted>`."""
        return f"{self.prefix}/workers/"

    def __str__(self) -> str:
        hosts = ",".join(e.removeprefix("http://") for e in self.endpoints)
        return f"etcd://{hosts}{self.prefix}"


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> bytes:
    """The `range_end` that selects every key starting with `prefix` (its last byte plus one)."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"  # every key


@dataclass(slots=True, frozen=True)
class KeyValue:
    key: str
    value: bytes
    lease: int = 0


@dataclass(slots=True, frozen=True)
class WatchEvent:
    """One change under a watched prefix; `value` is empty for a delete."""

    deleted: bool
    key: str
    value: bytes
    revision: int


class WatchCanceled(EtcdError):
    """etcd ended the watch (e.g. the revision it started from was compacted): read the state again."""


class EtcdClient:
    """Calls one of `endpoints` (the first that answers, remembered) with a deadline per call."""

    def __init__(self, endpoints: tuple[str, ...], timeout_s: float = 2.0) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        self._current = 0
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for i in range(len(self.endpoints)):
            index = (self._current + i) % len(self.endpoints)
            url = self.endpoints[index] + path
            try:
                timeout = aiohttp.ClientTimeout(total=self.timeout_s)
                async with self._http().post(url, data=orjson.dumps(body), timeout=timeout) as r:
                    raw = await r.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append(f"{self.endpoints[index]}: {exc or type(exc).__name__}")
                continue
            self._current = index
            try:
                answer = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise EtcdError(f"etcd {path} answered {r.status} with no JSON: {raw[:200]!r}") from None
            if r.status != 200 or ("error" in answer and "result" not in answer):
                message = answer.get("message") or answer.get("error") or answer
                raise EtcdError(f"etcd {path} answered {r.status}: {message}")
            return answer
        raise EtcdError(f"etcd is unreachable ({'; '.join(errors)})")

    async def healthy(self) -> bool:
        """One cheap round trip (the maintenance status) within the client's deadline."""
        try:
            await self._call("/v3/maintenance/status", {})
        except EtcdError:
            return False
        return True

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        answer = await self._call("/v3/kv/put", body)
        return int(answer["header"]["revision"])

    async def delete(self, key: str) -> int:
        answer = await self._call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(answer.get("deleted", 0))

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under `prefix` and the store's revision they were read at."""
        body = {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        answer = await self._call("/v3/kv/range", body)
        kvs = [
            KeyValue(_unb64(kv["key"]).decode(), _unb64(kv.get("value", "")), int(kv.get("lease", 0)))
            for kv in answer.get("kvs", [])
        ]
        return kvs, int(answer["header"]["revision"])

    async def grant(self, ttl_s: int) -> int:
        answer = await self._call("/v3/lease/grant", {"TTL": str(ttl_s)})
        if answer.get("error"):
            raise EtcdError(f"etcd refused a lease: {answer['error']}")
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew `lease` once; its new TTL in seconds, 0 if it has expired (put the keys again)."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """End `lease` now: etcd deletes every key attached to it."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if "not found" not in str(exc):  # already expired: nothing left to revoke
                raise

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """The changes under `prefix` from `start_revision` on, a batch at a time, until the connection
        ends (EtcdError) or etcd cancels the watch (WatchCanceled). No deadline: a watch is idle for long."""
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(prefix_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        url = self.endpoints[self._current] + "/v3/watch"
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout_s, sock_connect=self.timeout_s)
        try:
            async with self._http().post(url, data=orjson.dumps(body), timeout=timeout) as r:
                if r.status != 200:
                    raise EtcdError(f"etcd /v3/watch answered {r.status}")
                async for line in r.content:
                    if line.strip():
                        yield _watch_events(orjson.loads(line))
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise EtcdError(f"the etcd watch broke: {exc or type(exc).__name__}") from None
        raise EtcdError("etcd closed the watch")


def _watch_events(message: dict[str, Any]) -> list[WatchEvent]:
    if "error" in message:
        error = message["error"]
        detail = error.get("message", error) if isinstance(error, dict) else error
        raise EtcdError(f"the etcd watch broke: {detail}")
    result = message.get("result", {})
    if result.get("canceled"):
        reason = result.get("cancel_reason") or f"compacted at {result.get('compact_revision')}"
        raise WatchCanceled(f"etcd canceled the watch: {reason}")
    events = []
    for event in result.get("events", []):
        kv = event["kv"]
        events.append(
            WatchEvent(
                deleted=event.get("type") == "DELETE",
                key=_unb64(kv["key"]).decode(),
                value=_unb64(kv.get("value", "")),
                revision=int(kv.get("mod_revision", 0)),
            )
        )
    return events
