"""An engine's self-registration: its record under a lease in etcd, kept alive every third of the lease's
TTL, published again if the lease was lost (etcd down longer than the TTL), and withdrawn on a graceful
stop so that routers drain the engine at once instead of waiting for the lease to expire."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from microserve.registry.etcd import EtcdClient, EtcdError, EtcdTarget
from microserve.registry.record import Registration

log = logging.getLogger(__name__)

RETRY_S = 1.0


class Registrar:
    def __init__(self, target: EtcdTarget, record: Registration, ttl_s: int = 10) -> None:
        if ttl_s < 2:
            raise ValueError(f"--register-ttl must be at least 2 seconds, got {ttl_s}")
        self.target = target
        self.record = record
        self.ttl_s = ttl_s
        self.key = record.key(target.workers_prefix)
        self.lease = 0  # 0: not registered now
        self._client = EtcdClient(target.endpoints, timeout_s=max(1.0, ttl_s / 4))
        self._task: asyncio.Task[None] | None = None

    def start(self, when: Callable[[], bool] = lambda: True) -> None:
        """Register (and keep the registration alive) from the moment `when()` is true."""
        self._task = asyncio.create_task(self._run(when), name="registrar")

    async def _publish(self) -> None:
        lease = await self._client.grant(self.ttl_s)
        await self._client.put(self.key, self.record.to_json(), lease=lease)
        self.lease = lease
        log.info("registered %s in %s (lease %x, TTL %d s)", self.record.url, self.target, lease, self.ttl_s)

    async def _run(self, when: Callable[[], bool]) -> None:
        while not when():  # a router that finds us checks us at once: be ready to answer
            await asyncio.sleep(0.05)
        unreachable = False
        while True:
            try:
                if not self.lease:
                    await self._publish()
                elif await self._client.keepalive(self.lease) == 0:
                    log.warning("registration lease %x expired; registering again", self.lease)
                    self.lease = 0
                    continue
                if unreachable:
                    log.info("etcd is reachable again (%s)", self.target)
                    unreachable = False
                await asyncio.sleep(self.ttl_s / 3)
            except EtcdError as exc:
                if not unreachable:  # once per outage, not once a second
                    log.warning("cannot register in %s: %s; retrying", self.target, exc)
                    unreachable = True
                await asyncio.sleep(RETRY_S)

    async def withdraw(self) -> None:
        """Stop renewing and take the record out (revoking the lease deletes it); best effort: if etcd is
        down, the lease expires on its own within its TTL."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.lease:
            try:
                await self._client.revoke(self.lease)
                log.info("withdrew %s from %s", self.record.url, self.target)
            except EtcdError as exc:
                log.warning("could not withdraw from %s (%s); the lease expires in %d s", self.target, exc,
                            self.ttl_s)  # fmt: skip
            self.lease = 0
        await self._client.close()
