"""`SimWorkerHandle`: the verbs of the router's `WorkerHandle`, acting directly on a simulated replica.

Strategies hold it exactly as they hold the HTTP handle; instead of bytes it records each request's timings.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from microserve.bench.sender import RequestRecord
from microserve.engine.errors import EngineOverloaded
from microserve.engine.outputs import PrefillProgress, RequestOutput
from microserve.engine.sampling import SamplingParams
from microserve.engine_client import KVAddress
from microserve.router.continuation import StreamProgress
from microserve.router.deadlines import DeadlineConfig, attempt_deadlines
from microserve.router.request import Route, RoutedRequest
from microserve.router.upstream import WorkerFailure
from microserve.router.worker_handle import WorkerHandle
from microserve.router.workers import PickedWorker, Worker
from microserve.simulator.replica import SimReplica
from microserve.tenants.keys import PRIORITIES

T = TypeVar("T")

# What a strategy yields to the client: the timings are recorded, so the bytes carry nothing.
DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class Answer:
    """A request's answer as the client sees it: a chunk time per output that carries tokens."""

    record: RequestRecord
    token_ids: list[int] | None = None  # kept only when the workload reads the answers (multi-turn)
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def __call__(self, out: RequestOutput | PrefillProgress, now: float) -> None:
        assert isinstance(out, RequestOutput)
        if out.token_ids:
            self.record.chunk_times.append(now)
            if self.token_ids is not None:
                self.token_ids.extend(out.token_ids)
        if out.finished:
            self.record.prompt_len = out.prompt_tokens
            self.record.output_tokens = out.completion_tokens
            self.record.usage_reported = True
            if not self.done.done():
                self.done.set_result(None)


class SimRequest(RoutedRequest):
    """A routed request carrying its bench record and sampling, with an id that is the same every run."""

    __slots__ = ("answer", "params", "rank", "tenant")

    def __init__(
        self,
        request_id: str,
        route: Route,
        body: dict[str, Any],
        prompt_ids: list[int],
        answer: Answer,
        params: SamplingParams,
        timeout_s: float = 600.0,
        tenant: str = "",
        rank: int = PRIORITIES["normal"],
    ) -> None:
        super().__init__(route, body, b"", timeout_s=timeout_s, clock=asyncio.get_running_loop().time)
        self._id = request_id
        self.prompt_ids = prompt_ids
        self.answer = answer
        self.params = params
        self.tenant = tenant  # whose request, for the admission queue's fair share
        self.rank = rank  # its priority class (`tenants.keys.PRIORITIES`)


def sim_request(req: RoutedRequest) -> SimRequest:
    """The simulator routes only its own requests; they carry the record and sampling the replica needs."""
    if not isinstance(req, SimRequest):
        raise TypeError(f"the simulator serves SimRequests, not {type(req).__name__}")
    return req


class SimWorkerHandle(PickedWorker):
    """A picked replica, in flight from the pick until `release`: a `WorkerHandle`, as the router's."""

    __slots__ = ("deadlines", "replica")

    def __init__(self, worker: Worker, replica: SimReplica, deadlines: DeadlineConfig | None = None) -> None:
        super().__init__(worker)
        self.replica = replica
        self.deadlines = deadlines  # None: no first-byte or stall deadline (the simulator's default)

    # -- whole requests -----------------------------------------------------------------------------

    async def generate(self, req: RoutedRequest) -> AsyncIterator[bytes]:
        yield await self.generate_whole(req)

    async def generate_whole(self, req: RoutedRequest) -> bytes:
        try:
            await self._run(sim_request(req), None)
            return DONE
        finally:
            self.release()

    # -- microserving verbs -------------------------------------------------------------------------

    async def prep_recv(self, req: RoutedRequest, end: int) -> KVAddress:
        req = sim_request(req)
        matched = self._verb(lambda: self.replica.prep_recv(req.id, req.prompt_ids, end))
        return KVAddress({"request_id": req.id, "begin": matched, "end": end}, matched)

    async def remote_send(
        self, req: RoutedRequest, addr: KVAddress, dst: WorkerHandle, begin: int, end: int
    ) -> dict[str, int]:
        req = sim_request(req)
        if not isinstance(dst, SimWorkerHandle):
            raise TypeError(f"a simulated replica sends KV only to another one, not to {dst!r}")
        try:
            if begin >= end:
                return {"sent_tokens": 0, "bytes": 0}
            try:
                sent = await self.replica.send(req.id, req.prompt_ids[:end], begin, dst.replica)
            except (ValueError, EngineOverloaded) as exc:
                raise WorkerFailure(self.worker, f"microserving call failed: {exc}") from None
            return {"sent_tokens": sent, "bytes": sent * self.replica.config.cost.kv_bytes_per_token}
        finally:
            self.release()

    async def start_generate(self, req: RoutedRequest, begin: int) -> AsyncIterator[bytes]:
        try:
            await self._run(sim_request(req), begin)
            yield DONE
        finally:
            self.release()

    async def resume(self, req: RoutedRequest, progress: StreamProgress) -> AsyncIterator[bytes]:
        """Never called: a replica's stream does not break after its first byte (a stall or a refusal
        fails the attempt as a whole, `WorkerFailure`), so there is nothing to continue."""
        self.release()
        raise WorkerFailure(self.worker, "the simulator does not continue broken streams")
        yield b""  # an async generator, as the protocol's

    async def release_kv(self, req: RoutedRequest) -> None:
        self.replica.release(req.id)

    # -- plumbing -----------------------------------------------------------------------------------

    async def _run(self, req: SimRequest, begin: int | None) -> None:
        answer = req.answer
        try:
            self.replica.add_request(req.id, req.prompt_ids, req.params, answer, begin)
        except (ValueError, EngineOverloaded) as exc:
            if begin is not None:
                # The engine would free the reservation when its TTL ran out; no TTL runs here.
                self.replica.release(req.id)
            raise WorkerFailure(self.worker, f"microserving call failed: {exc}") from None
        try:
            await self._answer(answer)
        except asyncio.CancelledError:
            self.replica.abort(req.id)  # as the engine does when its client leaves
            raise
        except WorkerFailure:
            self.replica.abort(req.id)  # the router closed the connection: the engine aborts
            raise

    async def _answer(self, answer: Answer) -> None:
        """Wait for the answer, under the router's first-byte and stall deadlines (`upstream.py`)."""
        if self.deadlines is None:
            await answer.done
            return
        deadlines = attempt_deadlines(self.worker.load, self.deadlines)
        loop = asyncio.get_running_loop()
        chunks = answer.record.chunk_times
        seen = len(chunks)
        by = loop.time() + deadlines.first_byte_s
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(answer.done), max(0.0, by - loop.time()))
                return
            except TimeoutError:
                if len(chunks) > seen:  # tokens came since: the stall clock runs from the latest one
                    seen = len(chunks)
                    by = chunks[-1] + deadlines.stall_s
                    continue
            self.worker.record_failure("stalled")
            self.worker.breaker.trip()
            raise WorkerFailure(self.worker, deadlines.missed(first_byte=seen == 0))

    def _verb(self, call: Callable[[], T]) -> T:
        # The engine's refusals become WorkerFailure, so the host retries elsewhere as the router does.
        try:
            return call()
        except (ValueError, EngineOverloaded) as exc:
            raise WorkerFailure(self.worker, f"microserving call failed: {exc}") from None
