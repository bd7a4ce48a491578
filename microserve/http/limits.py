"""What one client connection may cost the HTTP server: a deadline for each phase of a request, caps on
connections (in all and per client address), and which connection to close to make room at a cap."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

KiB = 1024
MiB = 1024 * KiB


@dataclass(slots=True)
class ConnectionLimits:
    """Per-phase deadlines and connection caps (NGINX's client_header_timeout, client_body_timeout and
    keepalive_timeout; Envoy's connection limits), shared by every route of one server.

    A body must arrive within `body_timeout_s` plus one second per `body_min_rate` bytes received: a
    body trickled slower than that rate is cut, however steadily it trickles (NGINX's timeout between
    two reads would keep a one-byte-a-minute body open for ever)."""

    header_timeout_s: float = 10.0  # from the connection's start, or a later request's first byte
    body_timeout_s: float = 30.0
    body_min_rate: int = 1 * KiB  # bytes a second
    keepalive_s: float = 75.0  # idle between two requests
    max_body_bytes: int = 64 * KiB  # for routes that declare no limit of their own
    max_connections: int | None = None  # None: three quarters of the process's descriptor limit
    max_connections_per_client: int | None = None  # None: half of max_connections
    linger_s: float = 2.0  # after refusing a request mid-body: read and drop what still comes

    def __post_init__(self) -> None:
        timeouts = (self.header_timeout_s, self.body_timeout_s, self.keepalive_s)
        if min(timeouts) <= 0 or self.linger_s < 0:
            raise ValueError("connection timeouts must be positive")
        if self.body_min_rate < 1 or self.max_body_bytes < 0:
            raise ValueError("need body_min_rate >= 1 and max_body_bytes >= 0")
        for cap in (self.max_connections, self.max_connections_per_client):
            if cap is not None and cap < 1:
                raise ValueError("connection caps must be at least 1")

    def caps(self) -> tuple[int, int]:
        """(connections in all, connections per client address), defaults resolved: a quarter of the
        descriptors stays free for upstream connections, health checks and files whatever clients do."""
        total = self.max_connections or max(1, descriptor_limit() * 3 // 4)
        per_client = self.max_connections_per_client or max(1, total // 2)
        return total, min(per_client, total)


def descriptor_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_descriptor_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit (often 1024 of 524288): a server
    holding thousands of connections needs them. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # A hard limit of "infinity" some kernels refuse to set: then the soft one stays.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return descriptor_limit()


C = TypeVar("C", bound=Hashable)


class ConnectionTable(Generic[C]):
    """Open connections by client address, and those that may be closed to make room for a new one:
    idle between requests, or still sending their headers (a request's headers fit one packet, so one
    that takes long is a slowloris). As NGINX reuses its keep-alive connections when it runs out, a
    server at a cap closes the one of these that has waited longest instead of refusing the newcomer;
    a connection reading a body or being answered is never taken."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self._peer: dict[C, str] = {}
        self._count: dict[str, int] = {}
        self._waiting: dict[C, None] = {}  # insertion-ordered: the longest waiting first
        self._waiting_by_peer: dict[str, dict[C, None]] = {}

    def __len__(self) -> int:
        return len(self._peer)

    def count(self, peer: str) -> int:
        return self._count.get(peer, 0)

    def admit(self, conn: C, peer: str) -> tuple[bool, C | None]:
        """Take `conn` from `peer` in (as waiting) if there is room or room can be made: returns
        (admitted, the connection to close to make that room, if any)."""
        victim: C | None = None
        if self._count.get(peer, 0) >= self.max_per_client:
            victim = next(iter(self._waiting_by_peer.get(peer, ())), None)
            if victim is None:
                return False, None
        elif len(self._peer) >= self.max_total:
            victim = next(iter(self._waiting), None)
            if victim is None:
                return False, None
        if victim is not None:
            self.remove(victim)
        self._peer[conn] = peer
        self._count[peer] = self._count.get(peer, 0) + 1
        self.waiting(conn)
        return True, victim

    def waiting(self, conn: C) -> None:
        """`conn` may be closed to make room; it keeps its place if it was already waiting."""
        peer = self._peer.get(conn)
        if peer is not None and conn not in self._waiting:
            self._waiting[conn] = None
            self._waiting_by_peer.setdefault(peer, {})[conn] = None

    def working(self, conn: C) -> None:
        """`conn` reads a body or is being answered: not to be taken."""
        if conn not in self._waiting:
            return
        del self._waiting[conn]
        peer = self._peer[conn]
        peer_waiting = self._waiting_by_peer[peer]
        del peer_waiting[conn]
        if not peer_waiting:
            del self._waiting_by_peer[peer]

    def remove(self, conn: C) -> None:
        peer = self._peer.get(conn)
        if peer is None:
            return
        self.working(conn)
        del self._peer[conn]
        left = self._count[peer] - 1
        if left:
            self._count[peer] = left
        else:
            del self._count[peer]
