"""The etcd client and an engine's registration against a real etcd: reads under a prefix, a watch from a
revision, a lease that expires without keep-alive, a registration kept alive past its TTL, published
again after its lease was lost, and withdrawn at once on stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from microserve.registry.etcd import EtcdClient, EtcdError, EtcdTarget, WatchEvent
from microserve.registry.record import Registration
from microserve.registry.register import Registrar
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def client(etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    c = EtcdClient((f"http://{etcd.endpoint}",))
    try:
        yield c
    finally:
        await c.close()


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_prefix_reads_and_a_watch_from_a_revision(client: EtcdClient) -> None:
    await client.put("/t1/workers/a", b"1")
    await client.put("/t1/workersX", b"outside")  # shares the text but not the prefix
    kvs, revision = await client.get_prefix("/t1/workers/")
    assert [(kv.key, kv.value) for kv in kvs] == [("/t1/workers/a", b"1")]

    seen: list[WatchEvent] = []

    async def follow() -> None:
        async for batch in client.watch("/t1/workers/", revision + 1):
            seen.extend(batch)

    watcher = asyncio.create_task(follow())
    await client.put("/t1/workers/b", b"2")
    await client.delete("/t1/workers/a")

    async def both() -> bool:
        return len(seen) == 2

    await wait_for(both, "two events")
    watcher.cancel()
    assert [(e.deleted, e.key, e.value) for e in seen] == [
        (False, "/t1/workers/b", b"2"),
        (True, "/t1/workers/a", b""),
    ]


async def test_a_lease_without_keepalive_expires_and_takes_its_key(client: EtcdClient) -> None:
    lease = await client.grant(2)
    await client.put("/t2/k", b"v", lease=lease)
    assert await client.keepalive(lease) == 2

    async def gone() -> bool:
        return (await client.get_prefix("/t2/"))[0] == []

    await wait_for(gone, "the lease to expire")
    assert await client.keepalive(lease) == 0  # expired: the holder must register again


async def test_an_unreachable_etcd_is_an_etcd_error() -> None:
    from microserve.processes import free_port

    dead = EtcdClient((f"http://127.0.0.1:{free_port()}",), timeout_s=0.5)
    try:
        with pytest.raises(EtcdError, match="unreachable"):
            await dead.get_prefix("/")
        assert not await dead.healthy()
    finally:
        await dead.close()


async def test_a_registration_outlives_its_ttl_comes_back_and_withdraws(
    etcd: EtcdServer, client: EtcdClient
) -> None:
    target = EtcdTarget.parse(etcd.url("/t3"))
    record = Registration("http://127.0.0.1:9", ("m",), labels={"zone": "a"})
    registrar = Registrar(target, record, ttl_s=2)
    registrar.start()

    async def values() -> list[bytes]:
        return [kv.value for kv in (await client.get_prefix(target.workers_prefix))[0]]

    async def registered() -> bool:
        return await values() == [record.to_json()]

    try:
        await wait_for(registered, "the registration")
        await asyncio.sleep(3)  # past the TTL: kept alive
        assert await registered()
        await client.revoke(registrar.lease)  # the lease is lost (as after a long etcd outage)
        assert await values() == []
        await wait_for(registered, "the registration published again")
    finally:
        await registrar.withdraw()
    assert await values() == []  # withdrawn at once, not after the TTL


async def test_a_watch_carries_a_large_event_whole(client: EtcdClient) -> None:
    """One watch message far past a reader's usual line buffer (64 KiB) arrives whole."""
    _, revision = await client.get_prefix("/t4/")
    big = b"x" * 300_000
    seen: list[WatchEvent] = []

    async def follow() -> None:
        async for batch in client.watch("/t4/", revision + 1):
            seen.extend(batch)

    watcher = asyncio.create_task(follow())
    await client.put("/t4/big", big)

    async def arrived() -> bool:
        return len(seen) == 1

    await wait_for(arrived, "the big event")
    watcher.cancel()
    assert seen[0].value == big
