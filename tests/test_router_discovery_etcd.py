"""The etcd source through a network partition: a proxy in front of a real etcd stops passing bytes without
closing anything; the router notices within its probe deadline, keeps the last membership (a change made
meanwhile is not seen), and applies what changed once the partition heals. Workers are fake OpenAI
servers registered by hand, so no engine has to start."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

import pytest

from microserve.registry.etcd import EtcdClient, EtcdTarget
from microserve.registry.record import Registration
from microserve.router.config import RouterConfig
from microserve.router.health import HealthConfig
from microserve.router.router import Router
from tests.etcd_server import EtcdServer
from tests.router_fakes import fakes, serving

pytestmark = pytest.mark.slow


class PartitionProxy:
    """TCP to `port`; while `cut`, bytes are held (not dropped, nothing closed), as in a partition."""

    def __init__(self, port: int) -> None:
        self.port_to = port
        self.cut = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()

    async def _held(self) -> None:
        while self.cut:
            await asyncio.sleep(0.02)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._connect(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._held()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port_to)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                await self._held()
                writer.write(data)
                await writer.drain()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.close()


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_partition_keeps_the_membership_and_heals(etcd: EtcdServer) -> None:
    proxy = PartitionProxy(etcd.client_port)
    await proxy.start()
    direct = EtcdClient((f"http://{etcd.endpoint}",))
    registry = f"etcd://127.0.0.1:{proxy.port}/partition"
    prefix = EtcdTarget.parse(registry).workers_prefix
    try:
        async with fakes(2) as servers:
            records = [Registration(s.url, ("fake",), kind="openai") for s in servers]
            for record in records:
                await direct.put(record.key(prefix), record.to_json())
            health = HealthConfig(interval_s=0.2)
            router = Router(RouterConfig(discovery=[registry], health=health))
            async with serving(router) as client:
                assert {w.url for w in router.pool if w.available} == {s.url for s in servers}
                status = router.discovery.syncs[0].discovery.status

                proxy.cut = True
                await wait_for(lambda: not status.connected, "the partition noticed")
                await direct.delete(records[0].key(prefix))  # unseen while partitioned
                for _ in range(4):
                    r = await client.post(
                        "/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2}
                    )
                    assert r.status == 200
                assert {w.url for w in router.pool} == {s.url for s in servers}
                assert [len(s.generate_calls) for s in servers] == [2, 2]
                body = await (await client.get("/ready")).json()
                assert body["ready"] and not body["discovery"][0]["connected"]

                proxy.cut = False
                await wait_for(lambda: status.connected, "the partition healed")
                await wait_for(lambda: {w.url for w in router.pool} == {servers[1].url}, "the change applied")
    finally:
        await direct.close()
        await proxy.stop()
