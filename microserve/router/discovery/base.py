"""The discovery interface: a source of membership (a watched file, etcd; Kubernetes next) yields the whole
set of workers it knows each time that set changes, and says whether it can reach its registry now."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from microserve.router.workers import WorkerSpec


@dataclass(slots=True)
class DiscoveryStatus:
    """What /ready and the metrics say about one source."""

    connected: bool = False
    error: str | None = None  # the last failure while not connected
    since: float = field(default_factory=time.time)  # when `connected` last changed (Unix time)
    updates: int = 0  # membership sets read

    def up(self) -> None:
        if not self.connected:
            self.connected, self.since = True, time.time()
        self.error = None

    def down(self, error: str) -> None:
        if self.connected:
            self.connected, self.since = False, time.time()
        self.error = error

    def describe(self) -> dict[str, Any]:
        return {"connected": self.connected, "error": self.error, "since": self.since}


class Discovery(ABC):
    """One source of workers. `watch` runs until cancelled and never ends on a registry failure: it keeps
    quiet (the router keeps the last membership), records the failure in `status`, and retries."""

    def __init__(self, name: str) -> None:
        self.name = name  # as given on the command line, e.g. etcd://127.0.0.1:2379/microserve
        self.status = DiscoveryStatus()
        # Set once the source has either read a membership or failed to: the router waits for it (a
        # bounded time) before it serves, so a restarted router starts with the registry's fleet.
        self.settled = asyncio.Event()

    def reached(self) -> None:
        self.status.up()
        self.settled.set()

    def failed(self, error: str) -> None:
        self.status.down(error)
        self.settled.set()

    @abstractmethod
    def watch(self) -> AsyncIterator[list[WorkerSpec]]:
        """Every worker this source knows, first at once (or as soon as the registry answers), then again
        after each change."""

    async def close(self) -> None:  # noqa: B027 (a hook: most sources hold nothing)
        """Release what the source holds (connections); `watch` has been cancelled."""
