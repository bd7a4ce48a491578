"""The asyncio face of the engine: the core steps on a thread of its own, requests stream through queues.

The event loop never runs the model, so HTTP stays responsive while a step computes; one call per step
hands all of the step's outputs back to the loop. The stepping thread is the process's main thread when
served (`run_blocking`): torch's CPU kernels measured 1.5x slower on any other thread here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

from microserve.engine.core import EngineCore
from microserve.engine.errors import EngineDead, EngineOverloaded
from microserve.engine.hot_prefixes import hot_prefixes
from microserve.engine.kv_storage import KVLayout
from microserve.engine.outputs import PrefillProgress, RequestOutput
from microserve.engine.sampling import SamplingParams
from microserve.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_Command = Callable[[EngineCore], object]  # run on the engine thread; what it returns is dropped
T = TypeVar("T")


class AsyncEngine:
    def __init__(self, core: EngineCore, model_name: str, max_waiting: int = 1024) -> None:
        self.core = core
        self.model_name = model_name
        self.tokenizer: Tokenizer = core.tokenizer
        self.max_model_len = core.max_model_len
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stepping = False  # the stepping loop runs (on our thread or the caller's)
        self._stopped = threading.Event()
        self._dead: BaseException | None = None
        # Written by one thread each, so no lock: pending = submitted - taken.
        self._adds_submitted = 0
        self._adds_taken = 0

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Step on a new thread; call from inside the event loop that serves the requests."""
        if self._stepping:
            return
        self._loop = asyncio.get_running_loop()
        self._stepping = True
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._thread.start()

    def run_blocking(self, loop: asyncio.AbstractEventLoop) -> None:
        """Step on the calling thread until `stop`; `loop` (running on another thread) serves requests."""
        self._loop = loop
        self._stepping = True
        self._run()

    async def stop(self) -> None:
        if not self._stepping:
            return
        self._inbox.put(None)
        await asyncio.to_thread(self._stopped.wait)
        self._thread = None

    @property
    def kv_layout(self) -> KVLayout:
        assert self.core.kv.storage is not None
        return self.core.kv.storage.layout

    def transfer_time(self, num_tokens: int) -> float:
        return self.core.runner.transfer_time(num_tokens)

    def is_ready(self) -> bool:
        return self._stepping and self._dead is None

    # -- requests ---------------------------------------------------------------------------------

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, begin: int | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs; closing the iterator early aborts it and frees its blocks.

        With `begin`, the request starts from the KV reserved by `prep_recv` and received since. With
        `params.n` > 1 the outputs of the n choices interleave (`RequestOutput.index`); the stream ends
        once every choice has finished.
        """
        return self._stream(
            request_id,
            lambda core: core.add_request(request_id, prompt_ids, params, begin),
            validate=lambda: self.core.validate(prompt_ids, params),
            choices=params.n,
        )

    def prefill(
        self, request_id: str, prompt_ids: list[int], begin: int
    ) -> AsyncGenerator[PrefillProgress, None]:
        """Compute `prompt_ids`' KV for another engine; yields the exported payloads from `begin` on."""
        return self._stream(request_id, lambda core: core.add_prefill(request_id, prompt_ids, begin))

    async def prep_recv(self, request_id: str, prompt_ids: list[int], end: int, requester: str = "") -> int:
        return await self._call(lambda core: core.prep_recv(request_id, prompt_ids, end, requester))

    async def import_kv(self, request_id: str, payload: bytes) -> tuple[int, int]:
        return await self._call(lambda core: core.import_kv(request_id, payload))

    async def embed(self, prompts: list[list[int]], pooling: str = "mean") -> list[list[float]]:
        """Each prompt's embedding, computed on the engine thread between two steps."""
        return await self._call(lambda core: core.embed(prompts, pooling))

    async def release(self, request_id: str) -> bool:
        return await self._call(lambda core: core.release(request_id))

    async def hot_prefixes(self, max_tokens: int, limit: int) -> list[list[int]]:
        """The hottest cached prefixes (token ids), read on the engine thread (`engine/hot_prefixes.py`)."""
        return await self._call(lambda core: hot_prefixes(core.kv.pool, max_tokens, limit))

    async def _stream(
        self, request_id: str, add: _Command, validate: Callable[[], None] | None = None, choices: int = 1
    ) -> AsyncGenerator[Any, None]:
        if validate is not None:
            validate()  # fail before streaming starts
        if self._dead is not None:
            raise EngineDead(f"the engine loop has stopped: {self._dead}")
        pending = self._adds_submitted - self._adds_taken
        self.core.check_room(self.max_waiting, pending)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        stream: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request_id] = stream
        self._adds_submitted += 1
        self._submit(lambda core: self._add(core, request_id, add))
        finished = False
        unfinished = choices
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                unfinished -= item.finished
                finished = unfinished == 0
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(lambda core: core.abort_request(request_id))

    def _add(self, core: EngineCore, request_id: str, add: _Command) -> None:
        self._adds_taken += 1
        if request_id not in self._streams:
            return  # cancelled before the engine saw it
        try:
            add(core)
        except (ValueError, EngineOverloaded) as exc:
            self._deliver_error(request_id, exc)

    async def _call(self, fn: Callable[[EngineCore], T]) -> T:
        """Run `fn` on the engine thread between steps and await its result (or exception)."""
        if self._dead is not None:
            raise EngineDead(f"the engine loop has stopped: {self._dead}")
        assert self._loop is not None, "start() the engine first"
        future: asyncio.Future[T] = self._loop.create_future()

        def settle(result: Any, exc: BaseException | None) -> None:
            if future.done():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

        def command(core: EngineCore) -> None:
            try:
                self._call_loop(settle, fn(core), None)
            except Exception as exc:
                self._call_loop(settle, None, exc)

        self._submit(command)
        return await future

    async def abort(self, request_id: str) -> None:
        self._submit(lambda core: core.abort_request(request_id))

    def load(self) -> dict[str, Any]:
        return self.core.load()

    # -- the stepping thread ----------------------------------------------------------------------

    def _submit(self, command: _Command) -> None:
        self._inbox.put(command)

    def _run(self) -> None:
        core = self.core
        try:
            while True:
                # Block only when idle; otherwise take whatever arrived and step again.
                for command in self._drain(block=not core.has_work()):
                    if command is None:
                        self._stepping = False
                        return
                    command(core)
                if core.reservations:
                    core.expire_reservations()
                if core.has_work():
                    started = time.perf_counter()
                    outputs = core.step()
                    if outputs:  # a step that ran nothing says nothing of the step time
                        core.record_step_time(time.perf_counter() - started)
                    if outputs:
                        self._call_loop(self._dispatch, outputs)
        except BaseException as exc:  # the loop is dead: fail every stream rather than hang it
            log.exception("engine loop crashed")
            self._dead = exc
            self._call_loop(self._fail_all, exc)
        finally:
            self._stopped.set()

    def _drain(self, block: bool) -> list[_Command | None]:
        commands: list[_Command | None] = []
        if block:
            # Idle: sleep until a command arrives or the next reservation expires.
            deadline = self.core.reservations.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(queue.Empty):
                commands.append(self._inbox.get(timeout=timeout))
        with contextlib.suppress(queue.Empty):
            while True:
                commands.append(self._inbox.get_nowait())
        return commands

    def _call_loop(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(fn, *args)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        self._call_loop(self._put_error, request_id, exc)

    def _put_error(self, request_id: str, exc: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(EngineDead(f"the engine loop crashed: {exc!r}"))
