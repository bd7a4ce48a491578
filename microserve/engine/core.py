"""The engine step: schedule -> run the model -> post-process. Synchronous and driver-agnostic.

The same core runs behind the torch runner, the sim runner and (later) the simulator's virtual clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from microserve.engine.errors import PromptTooLong
from microserve.engine.kv_cache import KVCacheManager
from microserve.engine.outputs import RequestOutput
from microserve.engine.sampling import SamplingParams
from microserve.engine.scheduler import ScheduledBatch, Scheduler
from microserve.engine.sequence import Sequence, SequenceStatus
from microserve.model.detokenizer import IncrementalDetokenizer
from microserve.model.tokenizer import Tokenizer


class Runner(Protocol):
    def execute(self, batch: ScheduledBatch) -> list[int | None]: ...

    def forget(self, request_id: str) -> None: ...


@dataclass(slots=True)
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    text: str = ""  # the request's text so far, stop strings cut off
    sent: int = 0  # characters of `text` already handed out
    sent_tokens: int = 0


class EngineCore:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: Runner,
        tokenizer: Tokenizer,
        max_model_len: int,
    ) -> None:
        self.scheduler = scheduler
        self.kv: KVCacheManager = scheduler.kv
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = tokenizer.eos_token_ids
        self.requests: dict[str, _Request] = {}
        self.num_steps = 0

    # -- requests ---------------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise a ValueError (PromptTooLong for length) that says what is wrong with the request."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens and max_tokens is {params.max_tokens}"
            )

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        self.validate(prompt_ids, params)
        seq = Sequence(request_id, list(prompt_ids), params)
        self.requests[request_id] = _Request(seq, IncrementalDetokenizer(self.tokenizer))
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its blocks at once; returns its final output if it was live."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, SequenceStatus.FINISHED_ABORTED)
        return self._output(req)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        sampled = self.runner.execute(batch)
        self.num_steps += 1
        outputs: list[RequestOutput] = []
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, sampled, strict=True):
            self.kv.append(seq, n)
            if token is None:
                continue  # a chunk of a longer prefill: nothing to emit yet
            req = self.requests[seq.request_id]
            seq.token_ids.append(token)
            status = self._check_stop(req, token)
            if status is not None:
                self._finish(req, status)
            outputs.append(self._output(req))
        return outputs

    def _check_stop(self, req: _Request, token: int) -> SequenceStatus | None:
        seq, p = req.seq, req.seq.params
        stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)
        if stop_token and seq.num_completion_tokens > p.min_tokens:
            return SequenceStatus.FINISHED_STOPPED
        if not stop_token:
            req.text += req.detok.add(token)
            if p.stop and self._cut_at_stop_string(req):
                return SequenceStatus.FINISHED_STOPPED
        if seq.num_completion_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def _cut_at_stop_string(self, req: _Request) -> bool:
        # Only the tail can hold a new match: look back one stop string's length from the unsent text.
        longest = max(map(len, req.seq.params.stop))
        start = max(0, req.sent - longest)
        hits = [i for i in (req.text.find(s, start) for s in req.seq.params.stop) if i >= 0]
        if not hits:
            return False
        req.text = req.text[: min(hits)]
        return True

    def _finish(self, req: _Request, status: SequenceStatus) -> None:
        if status != SequenceStatus.FINISHED_STOPPED or not req.seq.params.stop:
            req.text += req.detok.flush()
        self.scheduler.finish(req.seq, status)
        self.runner.forget(req.seq.request_id)
        del self.requests[req.seq.request_id]

    def _output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        finished = seq.status.finished
        # Hold back what could still become the start of a stop string.
        holdback = 0 if finished or not seq.params.stop else max(map(len, seq.params.stop)) - 1
        upto = max(req.sent, len(req.text) - holdback)
        text = req.text[req.sent : upto]
        req.sent = upto
        new_tokens = seq.completion_token_ids[req.sent_tokens :]
        req.sent_tokens = seq.num_completion_tokens
        return RequestOutput(
            request_id=seq.request_id,
            token_ids=new_tokens,
            text=text,
            finished=finished,
            finish_reason=seq.status.finish_reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_completion_tokens,
            cached_tokens=seq.num_cached_tokens,
        )

    def load(self) -> dict[str, float | int]:
        kv = self.kv
        return {
            "waiting": self.num_waiting,
            "running": self.num_running,
            "kv_usage": round(kv.usage, 6),
            "kv_blocks_free": kv.num_free_blocks,
            "kv_blocks_total": kv.num_blocks,
            "block_size": kv.block_size,
            "prefix_hit_rate": round(kv.prefix_hit_rate, 6),
            "prefix_cache_queries": kv.prefix_queries,
            "prefix_cache_hits": kv.prefix_hits,
        }
