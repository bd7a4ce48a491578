"""`WorkerHandle`: a picked worker as a strategy sees it, declared once for every driver.

The router's `HTTPWorkerHandle` (`upstream.py`) calls an engine over HTTP; the simulator's
`SimWorkerHandle` acts on an in-process replica. Strategies are typed to this protocol only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from microserve.engine_client import KVAddress
    from microserve.router.continuation import StreamProgress
    from microserve.router.request import RoutedRequest
    from microserve.router.workers import Role, WorkerKind


class WorkerHandle(Protocol):
    """In flight from the pick until `release`; the verbs end their part of the request themselves."""

    @property
    def url(self) -> str: ...

    @property
    def kind(self) -> WorkerKind: ...

    @property
    def role(self) -> Role: ...

    @property
    def labels(self) -> dict[str, str]: ...

    @property
    def busy(self) -> int:
        """Requests in flight on this worker, this one included."""
        ...

    def release(self) -> None:
        """This worker's part of the request is done; safe to call more than once."""

    def generate(self, req: RoutedRequest) -> AsyncIterator[bytes]:
        """The whole request here; the client's bytes (one JSON body, or SSE frames)."""
        ...

    async def generate_whole(self, req: RoutedRequest) -> bytes:
        """The whole non-streamed request here; its JSON body, as `generate` would yield it."""
        ...

    def resume(self, req: RoutedRequest, progress: StreamProgress) -> AsyncIterator[bytes]:
        """Continue a stream that broke elsewhere, from the tokens already sent."""
        ...

    async def prep_recv(self, req: RoutedRequest, end: int) -> KVAddress:
        """Reserve blocks for the prompt's KV up to `end`; `.matched` is the prefix already held."""
        ...

    async def remote_send(
        self, req: RoutedRequest, addr: KVAddress, dst: WorkerHandle, begin: int, end: int
    ) -> dict[str, int]:
        """Compute the prompt's KV up to `end` here and push [begin, end) into `dst`'s reservation."""
        ...

    def start_generate(self, req: RoutedRequest, begin: int) -> AsyncIterator[bytes]:
        """Generate on top of the KV received for `req`, answering in the client's shape."""
        ...

    async def release_kv(self, req: RoutedRequest) -> None:
        """Drop `req`'s reservation here, if any; never raises."""
