"""`etcd://HOST:PORT[/prefix]`: engines' registrations under `<prefix>/workers/`, read whole, then followed
with a watch from the next revision. A lease that expires (an engine killed) deletes its key, which the
watch reports like a withdrawal. While etcd is unreachable the last membership stands; once it answers
again the whole prefix is read anew (what changed meanwhile is then applied at once)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from microserve.registry.etcd import EtcdClient, EtcdError, EtcdTarget, WatchEvent
from microserve.registry.record import Registration
from microserve.router.discovery.base import Discovery
from microserve.router.tasks import cancel_all
from microserve.router.workers import WorkerSpec

log = logging.getLogger(__name__)


def worker_spec(record: Registration) -> WorkerSpec:
    """The router's view of a registered worker (a ValueError for a bad URL, kind, role or weight)."""
    return WorkerSpec(
        record.url,
        kind=record.kind,  # type: ignore[arg-type]  # checked by WorkerSpec
        role=record.role,  # type: ignore[arg-type]
        weight=record.weight,
        labels=record.labels,
        models=record.models,
    )


class EtcdDiscovery(Discovery):
    def __init__(
        self, name: str, target: EtcdTarget, *, probe_interval_s: float = 1.0, timeout_s: float = 2.0
    ) -> None:
        super().__init__(name)
        self.target = target
        self.probe_interval_s = probe_interval_s  # how often a quiet watch is checked to be alive
        self.client = EtcdClient(target.endpoints, timeout_s=timeout_s)
        self.records: dict[str, WorkerSpec] = {}  # key -> worker, as last read

    @classmethod
    def from_url(cls, url: str) -> EtcdDiscovery:
        return cls(url, EtcdTarget.parse(url))

    def _record(self, key: str, value: bytes) -> None:
        try:
            self.records[key] = worker_spec(Registration.from_json(value))
        except ValueError as exc:
            log.warning("%s: ignoring %s: %s", self.name, key, exc)
            self.records.pop(key, None)

    async def watch(self) -> AsyncIterator[list[WorkerSpec]]:
        prefix = self.target.workers_prefix
        while True:
            try:
                kvs, revision = await self.client.get_prefix(prefix)
                self.records = {}
                for kv in kvs:
                    self._record(kv.key, kv.value)
                self.reached()
                self.status.updates += 1
                yield list(self.records.values())
                async for events in self._watch_alive(prefix, revision + 1):
                    if not events:
                        continue
                    for event in events:
                        if event.deleted:
                            self.records.pop(event.key, None)
                        else:
                            self._record(event.key, event.value)
                    self.status.updates += 1
                    yield list(self.records.values())
            except EtcdError as exc:
                if self.status.connected or self.status.error is None:
                    log.warning("%s: %s; keeping the last membership (%d workers)", self.name, exc,
                                len(self.records))  # fmt: skip
                self.failed(str(exc))
                await asyncio.sleep(self.probe_interval_s)

    async def _watch_alive(self, prefix: str, revision: int) -> AsyncIterator[list[WatchEvent]]:
        """The watch, ended with EtcdError when etcd stops answering a health probe: a registry that
        vanishes without closing its connections (a network partition) would otherwise look quiet."""
        events: asyncio.Queue[list[WatchEvent] | BaseException] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for batch in self.client.watch(prefix, revision):
                    events.put_nowait(batch)
            except Exception as exc:  # handed to the reader, which raises it
                events.put_nowait(exc)

        async def probe() -> None:
            while True:
                await asyncio.sleep(self.probe_interval_s)
                if not await self.client.healthy():
                    events.put_nowait(EtcdError("etcd stopped answering"))
                    return

        tasks = [asyncio.create_task(pump()), asyncio.create_task(probe())]
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            await cancel_all(tasks)

    async def close(self) -> None:
        await self.client.close()
