"""One simulated engine: a real `EngineCore` (scheduler, KV cache, sim runner) stepped on virtual time.

Each step runs the core at once, waits its modelled seconds on the virtual clock, then hands its outputs over.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from microserve.engine.config import CacheConfig
from microserve.engine.hot_prefixes import hot_prefixes
from microserve.engine.kv_send import KVSender, send_id
from microserve.engine.outputs import KVPiece, PrefillProgress, RequestOutput
from microserve.engine.sampling import SamplingParams
from microserve.engine.scheduler import SchedulerConfig
from microserve.engine_builder import assemble_core, check_capacity
from microserve.model.tokenizer import Tokenizer
from microserve.runner.cost_model import CostModel
from microserve.runner.sim_runner import SimRunner

# Called with each output of a request (or prefill) and the virtual time it is handed over.
Sink = Callable[[RequestOutput | PrefillProgress, float], None]


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """What every replica of a fleet shares: its cost model, KV capacity and batching limits."""

    cost: CostModel
    num_blocks: int
    block_size: int = 16
    max_model_len: int = 8192
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_waiting: int = 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        check_capacity(self.num_blocks, self.block_size, self.max_model_len)

    @staticmethod
    def blocks_for_memory(cost: CostModel, memory_bytes: int, block_size: int) -> int:
        """KV blocks that fit in `memory_bytes` of the profiled model's KV, as the sim engine counts them."""
        if cost.kv_bytes_per_token < 1:
            raise ValueError("the profile has no kv_bytes_per_token: give --num-kv-blocks instead")
        return memory_bytes // (cost.kv_bytes_per_token * block_size)


class SimReplica:
    """The verbs of one engine (generate, prep_recv, import, release, prefill-and-send) on its core."""

    def __init__(
        self, name: str, config: ReplicaConfig, tokenizer: Tokenizer, vocab_words: list[int]
    ) -> None:
        self.name = name
        self.config = config
        self._step_s = 0.0
        runner = SimRunner(config.cost, vocab_words, clock=self._record, block_size=config.block_size)
        # The engine's own assembly; the text is never read here, so nothing is detokenized.
        self.core = assemble_core(
            runner,
            tokenizer,
            SimRunner.storage_layout(config.block_size),
            config.num_blocks,
            CacheConfig(config.block_size, enable_prefix_caching=config.enable_prefix_caching),
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
            config.max_model_len,
            detokenize=False,
        )
        self.runner = runner
        self._sinks: dict[str, Sink] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stepping = False  # a step is running or about to: new work joins the next one
        self._timer: asyncio.Handle | None = None
        self.busy_s = 0.0  # virtual seconds spent in steps
        self.frozen_until = 0.0  # a hung engine (SIGSTOP) steps and answers nothing before this time

    def _record(self, seconds: float) -> None:
        # The sim runner's clock: note the step's modelled time instead of sleeping through it.
        self._step_s = seconds

    # -- the engine loop ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Step on `loop` from now on whenever there is work."""
        self._loop = loop
        self._kick()

    def freeze(self, seconds: float) -> None:
        """Hang for `seconds` from now, as a SIGSTOPped engine does: no step, no output, no load report."""
        assert self._loop is not None
        self.frozen_until = self._loop.time() + seconds

    @property
    def frozen(self) -> bool:
        return self._loop is not None and self._loop.time() < self.frozen_until

    def stop(self) -> None:
        self._loop = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _kick(self) -> None:
        # A verb brought work: step at the current instant, after the other verbs of this instant, so
        # that requests arriving together share a step as they would on the engine thread.
        if not self._stepping and self._loop is not None:
            self._stepping = True
            self._timer = self._loop.call_soon(self._step)

    def _step(self) -> None:
        """Run one engine step now, and hand its outputs over once its modelled time has passed.

        A plain callback and timer instead of a task that sleeps: the step is the simulation's hot path.
        """
        core = self.core
        if self._loop is None or not core.has_work():
            self._stepping = False
            return
        steps = core.num_steps
        outputs = core.step()
        if core.num_steps == steps:
            # Nothing fits (blocks held by reservations or transfers): the next verb kicks again.
            self._stepping = False
            return
        self.busy_s += self._step_s
        core.record_step_time(self._step_s)
        self._timer = self._loop.call_later(self._step_s, self._step_done, outputs)

    def _step_done(self, outputs: list[RequestOutput | PrefillProgress]) -> None:
        assert self._loop is not None
        now = self._loop.time()
        if now < self.frozen_until:  # the step's outputs leave when the engine thaws
            self._timer = self._loop.call_at(self.frozen_until, self._step_done, outputs)
            return
        sinks = self._sinks
        for out in outputs:
            sink = sinks.get(out.request_id)
            if sink is not None:
                if out.finished:
                    del sinks[out.request_id]
                sink(out, now)
        self._step()

    # -- verbs --------------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink, begin: int | None
    ) -> None:
        """Queue a request (from the KV reserved under its id when `begin` is given); outputs go to `sink`."""
        self.core.check_room(self.config.max_waiting)
        self.core.add_request(request_id, prompt_ids, params, begin)
        self._sinks[request_id] = sink
        self._kick()

    def abort(self, request_id: str) -> None:
        """The caller went away (a timeout): free the request's blocks at once, as the engine does."""
        self._sinks.pop(request_id, None)
        self.core.abort_request(request_id)
        self._kick()

    def prep_recv(self, request_id: str, prompt_ids: list[int], end: int) -> int:
        return self.core.prep_recv(request_id, prompt_ids, end)

    def import_kv(self, request_id: str, payload: bytes | memoryview) -> None:
        self.core.import_kv(request_id, payload)

    def release(self, request_id: str) -> bool:
        released = self.core.release(request_id)
        self._kick()  # its blocks may let a waiting request in
        return released

    def hot_prefixes(self, max_tokens: int, limit: int) -> list[list[int]]:
        return hot_prefixes(self.core.kv.pool, max_tokens, limit)

    async def prefill(
        self, request_id: str, prompt_ids: list[int], begin: int
    ) -> AsyncGenerator[PrefillProgress, None]:
        """`prompt_ids`' KV computed for another engine, as `AsyncEngine.prefill` yields it from `begin`."""
        progress: asyncio.Queue[RequestOutput | PrefillProgress] = asyncio.Queue()
        self.core.add_prefill(request_id, prompt_ids, begin)
        self._sinks[request_id] = lambda out, now: progress.put_nowait(out)
        self._kick()
        finished = False
        try:
            while not finished:
                step = await progress.get()
                if not isinstance(step, PrefillProgress):  # the engine core gives a prefill nothing else
                    raise RuntimeError(f"{request_id}: a request's output came for a prefill")
                finished = step.finished
                yield step
        finally:
            if not finished:
                self.abort(request_id)

    async def send(self, request_id: str, prompt_ids: list[int], begin: int, dst: SimReplica) -> int:
        """Compute `prompt_ids`' KV here and push [begin, end) into `dst`'s reservation: the engine's own
        send loop (`KVSender`), each piece imported in process after its modelled transfer time on the
        virtual clock. Returns the tokens sent."""

        async def push(piece: KVPiece) -> None:
            dst.import_kv(request_id, piece.data)

        sender = KVSender(push, self.runner.transfer_time)
        sent = await sender.send(self.prefill(send_id(request_id), prompt_ids, begin))
        return sent.tokens

    def load(self) -> tuple[int, int, float]:
        """(waiting, running, KV usage), what the router's load poll reads."""
        core = self.core
        return core.num_waiting, core.num_running, core.kv.usage
