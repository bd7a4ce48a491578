"""The asyncio face of the engine: the core steps on its own thread, requests stream through queues.

The event loop never runs the model, so HTTP stays responsive while a step computes; one call per step
hands all of the step's outputs back to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from microserve.engine.core import EngineCore
from microserve.engine.errors import EngineDead, EngineOverloaded
from microserve.engine.outputs import RequestOutput
from microserve.engine.sampling import SamplingParams
from microserve.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_Command = Callable[[EngineCore], None]


class AsyncEngine:
    def __init__(self, core: EngineCore, model_name: str, max_waiting: int = 1024) -> None:
        self.core = core
        self.model_name = model_name
        self.tokenizer: Tokenizer = core.tokenizer
        self.max_model_len = core.max_model_len
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        # Written by one thread each, so no lock: pending = submitted - taken.
        self._adds_submitted = 0
        self._adds_taken = 0

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the stepping thread; call from inside the running event loop."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._inbox.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def is_ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    # -- requests ---------------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing the iterator early aborts it and frees its blocks."""
        if self._dead is not None:
            raise EngineDead(f"the engine loop has stopped: {self._dead}")
        pending = self._adds_submitted - self._adds_taken
        if self.core.num_waiting + pending >= self.max_waiting:
            raise EngineOverloaded(f"{self.max_waiting} requests are already waiting; retry later")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        self.core.validate(prompt_ids, params)  # fail before streaming starts
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        self._adds_submitted += 1
        self._submit(lambda core: self._add(core, request_id, prompt_ids, params))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(lambda core: core.abort_request(request_id))

    def _add(self, core: EngineCore, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._adds_taken += 1
        if request_id not in self._streams:
            return  # cancelled before the engine saw it
        try:
            core.add_request(request_id, prompt_ids, params)
        except ValueError as exc:
            self._deliver_error(request_id, exc)

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
                        return
                    command(core)
                if core.has_work():
                    outputs = core.step()
                    if outputs:
                        self._call_loop(self._dispatch, outputs)
        except BaseException as exc:  # the loop is dead: fail every stream rather than hang it
            log.exception("engine loop crashed")
            self._dead = exc
            self._call_loop(self._fail_all, exc)

    def _drain(self, block: bool) -> list[_Command | None]:
        commands = [self._inbox.get()] if block else []
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
