"""The engine step: schedule -> run the model -> post-process. Synchronous and driver-agnostic.

The same core runs behind the torch runner, the sim runner and (later) the simulator's virtual clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from microserve.engine.errors import EmbeddingsUnsupported, EngineOverloaded, PromptTooLong
from microserve.engine.grammar import GrammarCompiler, GrammarMatcher
from microserve.engine.kv_cache import KVCacheManager
from microserve.engine.kv_storage import KVLayout, KVPayloadError, KVStorage
from microserve.engine.outputs import KVPiece, PrefillProgress, RequestOutput, Timeline
from microserve.engine.reservations import ReservationError, ReservationQuotaExceeded, ReservationTable
from microserve.engine.sampling import InvalidParams, SamplingParams
from microserve.engine.scheduler import ScheduledBatch, Scheduler
from microserve.engine.sequence import Sequence, SequenceStatus
from microserve.model.detokenizer import IncrementalDetokenizer
from microserve.model.tokenizer import Tokenizer

# Exported KV travels in pieces of at most this many tokens: bounded request bodies on the receiver,
# and the first piece leaves while later ones are still being exported.
TRANSFER_PIECE_TOKENS = 256
# Weight of the newest step in the smoothed step time: about the last ten steps count.
STEP_TIME_ALPHA = 0.1


class Runner(Protocol):
    """Computes (or models) a scheduled batch. The torch and sim runners are the two drivers."""

    layout: KVLayout  # the KV layout its storage must have

    def bind(self, storage: KVStorage) -> None: ...

    def execute(self, batch: ScheduledBatch) -> list[int | None]: ...

    def forget(self, request_id: str) -> None: ...

    def transfer_time(self, num_tokens: int) -> float:
        """Extra time to model for moving this many tokens' KV (the sim backend); 0 for real engines."""
        ...


@dataclass(slots=True)
class _Prefill:
    """KV computed here for another engine: exported chunk by chunk as it is computed."""

    seq: Sequence
    exported_upto: int  # KV of [begin, exported_upto) has been handed out


@dataclass(slots=True)
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer | None  # None: nobody reads this request's text (the simulator)
    text: str = ""  # the request's text so far, stop strings cut off
    sent: int = 0  # characters of `text` already handed out
    sent_tokens: int = 0
    stop_reason: str | int | None = None
    group: str = ""  # the request id the client knows (its choices' sequences have ids of their own)


@runtime_checkable
class Embedder(Protocol):
    """A runner that can pool a prompt's final hidden states (the torch runner)."""

    def embed(self, prompts: list[list[int]], pooling: str = "mean") -> Any: ...


class EngineCore:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: Runner,
        tokenizer: Tokenizer,
        max_model_len: int,
        reservation_ttl_s: float = 30.0,
        detokenize: bool = True,
        reservation_share: float = 0.5,
    ) -> None:
        self.scheduler = scheduler
        self.kv: KVCacheManager = scheduler.kv
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = tokenizer.eos_token_ids
        self.requests: dict[str, _Request] = {}
        self.prefills: dict[str, _Prefill] = {}
        self.groups: dict[str, list[str]] = {}  # request id -> its choices' sequence ids (n > 1)
        self._forks: dict[str, list[Sequence]] = {}  # first choice's id -> choices forked after its prefill
        # One requester may hold this share of the cache in reservations, and at least one whole
        # context: so a caller that reserves and never sends cannot starve the engine (issue 20, fault 5).
        share_blocks = int(self.kv.num_blocks * reservation_share)
        per_requester = max(share_blocks, self.kv.blocks_for(max_model_len))
        self.reservations = ReservationTable(reservation_ttl_s, per_requester)
        self.num_steps = 0
        # The driver's measured (or modelled) seconds per step, smoothed: the router derives its
        # first-byte and stall deadlines from it. 0 until the first step.
        self.step_s = 0.0
        # Off in the simulator: nobody reads the text there, and decoding is per-token work on its hot
        # path. A request with stop strings is decoded anyway, since they are matched on its text.
        self.detokenize = detokenize
        self._grammars: GrammarCompiler | None = None  # made on the first structured-output request

    # -- requests ---------------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise a ValueError (PromptTooLong for length) that says what is wrong with the request."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.num_prior_output_tokens > len(prompt_ids):
            raise InvalidParams("prior_output_tokens exceeds the prompt's length", "prior_output_tokens")
        if params.choice_index and params.n > 1:
            raise InvalidParams("choice_index is for a single-choice request (n = 1)", "choice_index")
        if any(t >= vocab for t in params.logit_bias):
            raise InvalidParams(f"logit_bias token ids must be in [0, {vocab})", "logit_bias")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens and max_tokens is {params.max_tokens}",
                by_itself=len(prompt_ids) >= self.max_model_len,
            )

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, begin: int | None = None
    ) -> None:
        """Queue a request; with `begin`, start it from the KV reserved (and received) under its id."""
        self._check_new_id(request_id, reserved_ok=begin is not None)
        self.validate(prompt_ids, params)
        grammar = self._grammar_matcher(prompt_ids, params)  # before anything is taken: it may refuse
        if begin is None:
            seq = Sequence(request_id, list(prompt_ids), params, index=params.choice_index)
        else:
            seq = self._take_reservation(request_id, prompt_ids, params, begin)
        seq.grammar = grammar
        self.requests[request_id] = _Request(seq, self._detokenizer(params), group=request_id)
        self.scheduler.add(seq)
        if params.n > 1:
            # The other choices wait for the first one's prefill, then share its prompt blocks (fork).
            children = [
                Sequence(f"{request_id}#{i}", list(prompt_ids), params, index=i) for i in range(1, params.n)
            ]
            for child in children:
                child.grammar = self._grammar_matcher(prompt_ids, params)  # each choice its own state
                self.requests[child.request_id] = _Request(child, self._detokenizer(params), group=request_id)
            self._forks[request_id] = children
            self.groups[request_id] = [request_id] + [c.request_id for c in children]

    def _grammar_matcher(self, prompt_ids: list[int], params: SamplingParams) -> GrammarMatcher | None:
        """A matcher for the request's grammar, advanced over the tokens an earlier engine generated
        (the prompt's last `num_prior_output_tokens`): a continued stream resumes mid-grammar."""
        if params.grammar is None:
            return None
        if self._grammars is None:
            self._grammars = GrammarCompiler.for_tokenizer(self.tokenizer)
        matcher = self._grammars.matcher(params.grammar)
        prior = params.num_prior_output_tokens
        if prior and not matcher.advance(prompt_ids[len(prompt_ids) - prior :]):
            raise InvalidParams(
                f"the prompt's last {prior} tokens (prior_output_tokens) do not match the grammar of "
                f"{params.grammar.param}: {matcher.error}",
                "prior_output_tokens",
            )
        return matcher

    def _detokenizer(self, params: SamplingParams) -> IncrementalDetokenizer | None:
        if not (self.detokenize or params.stop):
            return None
        return IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)

    def _fork_choices(self, first: Sequence) -> None:
        """Start the other choices from `first`'s computed prompt: its full blocks shared, and the last
        prompt token computed again by each, so that each samples its own first token."""
        for child in self._forks.pop(first.request_id):
            if child.status.finished:
                continue  # aborted meanwhile
            if not (self.kv.fork(first, child) and self.kv.rewind(child, child.num_tokens - 1)):
                self.kv.free(child)  # no free block for the copy: it computes its prompt from the cache
                self.scheduler.add(child)
                continue
            child.num_cached_tokens = first.num_cached_tokens
            child.status = SequenceStatus.RUNNING
            self.scheduler.running.append(child)

    def check_room(self, max_waiting: int, pending: int = 0) -> None:
        """Refuse a new request (EngineOverloaded, HTTP 503) once `max_waiting` wait, `pending` not yet added
        counted: the engine's queue bound, for the engine process and the simulator's replicas alike."""
        if self.num_waiting + pending >= max_waiting:
            raise EngineOverloaded(f"{max_waiting} requests are already waiting; retry later")

    def _check_new_id(self, request_id: str, reserved_ok: bool = False) -> None:
        if request_id in self.requests or request_id in self.prefills:
            raise ValueError(f"request id {request_id!r} is already in flight")
        if request_id in self.reservations and not reserved_ok:
            raise ValueError(f"request id {request_id!r} already holds a KV reservation")

    # -- microserving: the engine's KV verbs --------------------------------------------------------

    def prep_recv(self, request_id: str, prompt_ids: list[int], end: int, requester: str = "") -> int:
        """Reserve blocks to receive KV for prompt[matched:end]; returns `matched`, the prefix held here.
        `requester` (the caller's address) is charged the blocks, up to its share of the cache."""
        self._check_new_id(request_id)
        if not 0 < end <= len(prompt_ids) or end > self.max_model_len:
            raise ValueError(f"end={end} must be in [1, {min(len(prompt_ids), self.max_model_len)}]")
        seq = Sequence(request_id, list(prompt_ids[:end]), SamplingParams(max_tokens=1))
        cached = self.kv.match_prefix(seq.token_ids, limit=end)
        matched = len(cached) * self.kv.block_size
        if not self.kv.allocate(seq, end - matched, cached):
            raise EngineOverloaded(f"no free KV blocks to receive {end - matched} tokens; retry later")
        blocks = len(seq.block_table)
        try:  # after the cache's own check: a full cache is the answer that says more
            self.reservations.check_quota(requester, blocks)
        except ReservationQuotaExceeded:
            self.kv.free(seq)
            raise
        self.reservations.add(seq, end, matched, requester=requester, blocks=blocks)
        return matched

    def import_kv(self, request_id: str, payload: bytes | memoryview) -> tuple[int, int]:
        """Write received KV into the request's reservation; ranges must arrive without gaps."""
        res = self.reservations.get(request_id)
        parsed = self.kv.parse(payload)
        if parsed.begin > res.received_upto:
            raise KVPayloadError(
                f"KV for tokens [{res.received_upto}, {parsed.begin}) is missing before this payload"
            )
        begin, end = self.kv.import_kv(res.seq, parsed)
        res.received_upto = max(res.received_upto, end)
        return begin, end

    def release(self, request_id: str) -> bool:
        """Drop a reservation. KV that arrived stays behind in the prefix cache (full blocks), so a
        later request with that prefix starts from it: this is how a context migrates."""
        res = self.reservations.pop(request_id)
        if res is None:
            return False
        self.kv.append(res.seq, res.received_upto - res.seq.num_computed_tokens)
        self.kv.free(res.seq)
        return True

    def expire_reservations(self, now: float | None = None) -> list[str]:
        expired = [r.seq.request_id for r in self.reservations.expired(now)]
        for request_id in expired:
            self.release(request_id)
        return expired

    def add_prefill(self, request_id: str, prompt_ids: list[int], begin: int) -> None:
        """Compute the KV of `prompt_ids` without sampling; `step` exports it from `begin` on as it goes."""
        self._check_new_id(request_id)
        if not prompt_ids or len(prompt_ids) > self.max_model_len:
            raise ValueError(f"a prefill needs 1 to {self.max_model_len} tokens, got {len(prompt_ids)}")
        seq = Sequence(request_id, list(prompt_ids), SamplingParams(max_tokens=1), prefill_only=True)
        self.prefills[request_id] = _Prefill(seq, exported_upto=begin)
        self.scheduler.add(seq)

    def _take_reservation(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, begin: int
    ) -> Sequence:
        res = self.reservations.get(request_id)
        seq = res.seq
        if list(prompt_ids[: res.end]) != seq.token_ids:
            raise ReservationError("start_generate's prompt differs from the one given to prep_recv")
        if begin > res.received_upto:
            raise ReservationError(
                f"KV for tokens [{res.received_upto}, {begin}) never arrived; cannot start at {begin}"
            )
        # At least the last prompt token is computed here: its logits give the first output token.
        start = min(begin, len(prompt_ids) - 1)
        if start >= seq.num_computed_tokens:
            self.kv.append(seq, start - seq.num_computed_tokens)
        elif not self.kv.rewind(seq, start):
            raise EngineOverloaded("no free KV block to start generating; retry later")
        self.reservations.pop(request_id)
        seq.token_ids = list(prompt_ids)
        seq.num_prompt_tokens = len(prompt_ids)
        seq.params = params
        seq.num_cached_tokens = start
        seq.arrival_time = time.monotonic()  # its queue wait starts now, not at prep_recv
        return seq

    def embed(self, prompts: list[list[int]], pooling: str = "mean") -> list[list[float]]:
        """Each prompt's embedding (see `TorchRunner.embed`); runs between steps, outside the scheduler."""
        if not isinstance(self.runner, Embedder):
            raise EmbeddingsUnsupported("This engine's backend computes no embeddings.")
        for ids in prompts:
            if not ids:
                raise ValueError("An input to embed must have at least one token.")
            if len(ids) > self.max_model_len:
                raise PromptTooLong(
                    f"An input has {len(ids)} tokens; this model's context is {self.max_model_len}."
                )
        result: list[list[float]] = self.runner.embed(prompts, pooling).tolist()
        return result

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its blocks at once; returns its final output if it was live."""
        prefill = self.prefills.pop(request_id, None)
        if prefill is not None:
            self.scheduler.finish(prefill.seq, SequenceStatus.FINISHED_ABORTED)
            return None
        last = None
        self._forks.pop(request_id, None)
        for seq_id in self.groups.pop(request_id, [request_id]):
            req = self.requests.get(seq_id)
            if req is not None:
                self._finish(req, SequenceStatus.FINISHED_ABORTED)
                last = self._output(req)
        return last

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput | PrefillProgress]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        started = time.monotonic()
        sampled = self.runner.execute(batch)
        done = time.monotonic()
        self.num_steps += 1
        outputs: list[RequestOutput | PrefillProgress] = []
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, sampled, strict=True):
            if seq.num_computed_tokens < seq.num_prompt_tokens:  # a chunk of prompt (for traces)
                seq.num_prefill_chunks += 1
                if seq.scheduled_time is None:
                    seq.scheduled_time = started
            self.kv.append(seq, n)
            if seq.prefill_only:
                outputs.append(self._prefill_progress(seq))
                continue
            if token is None:
                continue  # a chunk of a longer prefill: nothing to emit yet
            if seq.request_id in self._forks:
                self._fork_choices(seq)
            req = self.requests[seq.request_id]
            seq.token_ids.append(token)
            if seq.grammar is not None:
                seq.grammar.accept(token)  # a forbidden token fails the matcher, which then terminates
            if seq.first_token_time is None:
                seq.first_token_time = done
            status = self._check_stop(req, token)
            if status is not None:
                self._finish(req, status)
            outputs.append(self._output(req))
        return outputs

    def _prefill_progress(self, seq: Sequence) -> PrefillProgress:
        # Export on the engine thread, between steps: the blocks cannot be preempted away meanwhile.
        prefill = self.prefills[seq.request_id]
        upto = seq.num_computed_tokens
        pieces = []
        exported_at = time.monotonic()
        for begin in range(prefill.exported_upto, upto, TRANSFER_PIECE_TOKENS):
            end = min(begin + TRANSFER_PIECE_TOKENS, upto)
            pieces.append(KVPiece(begin, end, self.kv.export_kv(seq, begin, end)))
        export_s = time.monotonic() - exported_at
        prefill.exported_upto = max(prefill.exported_upto, upto)
        finished = upto == seq.num_tokens
        timeline = None
        if finished:
            del self.prefills[seq.request_id]
            self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)  # its full blocks stay cached
            timeline = _timeline(seq)
        return PrefillProgress(seq.request_id, pieces, finished, exported_at, export_s, timeline)

    def _check_stop(self, req: _Request, token: int) -> SequenceStatus | None:
        seq, p = req.seq, req.seq.params
        stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)
        if stop_token and seq.num_completion_tokens > p.min_tokens:
            # vLLM's stop_reason: the stop token id that ended it; None for EOS.
            req.stop_reason = token if token in p.stop_token_ids else None
            return SequenceStatus.FINISHED_STOPPED
        if not stop_token and req.detok is not None:
            req.text += req.detok.add(token)
            if p.stop and self._cut_at_stop_string(req):
                return SequenceStatus.FINISHED_STOPPED
        if seq.grammar is not None and seq.grammar.terminated:
            return SequenceStatus.FINISHED_STOPPED  # the answer is complete: the grammar allows no more
        if seq.num_completion_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def _cut_at_stop_string(self, req: _Request) -> bool:
        # Only the tail can hold a new match: look back one stop string's length from the unsent text.
        longest = max(map(len, req.seq.params.stop))
        start = max(0, req.sent - longest)
        hits = [(i, s) for s in req.seq.params.stop if (i := req.text.find(s, start)) >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        req.stop_reason = stop
        req.text = req.text[: at + len(stop)] if req.seq.params.include_stop_str_in_output else req.text[:at]
        return True

    def _finish(self, req: _Request, status: SequenceStatus) -> None:
        if req.detok is not None and (status != SequenceStatus.FINISHED_STOPPED or not req.seq.params.stop):
            req.text += req.detok.flush()
        self.scheduler.finish(req.seq, status)
        self.runner.forget(req.seq.request_id)
        del self.requests[req.seq.request_id]
        group = self.groups.get(req.group)
        if group is not None and not any(seq_id in self.requests for seq_id in group):
            del self.groups[req.group]

    def _output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        finished = seq.status.finished
        # Hold back what could still become the start of a stop string.
        holdback = 0 if finished or not seq.params.stop else max(map(len, seq.params.stop)) - 1
        upto = max(req.sent, len(req.text) - holdback)
        text = req.text[req.sent : upto]
        req.sent = upto
        new_tokens = seq.completion_token_ids[req.sent_tokens :]
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = seq.logprobs[req.sent_tokens : seq.num_completion_tokens]
        prompt_logprobs = None
        if seq.params.prompt_logprobs is not None and req.sent_tokens == 0:
            prompt_logprobs = seq.prompt_logprobs
        req.sent_tokens = seq.num_completion_tokens
        return RequestOutput(
            request_id=req.group,
            token_ids=new_tokens,
            text=text,
            finished=finished,
            finish_reason=seq.status.finish_reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_completion_tokens,
            cached_tokens=seq.num_cached_tokens,
            index=seq.index,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            stop_reason=req.stop_reason if finished else None,
            timeline=_timeline(seq) if finished else None,
        )

    def record_step_time(self, seconds: float) -> None:
        """The driver says how long the last step took (wall time, or the simulator's modelled time)."""
        if self.step_s == 0.0:
            self.step_s = seconds
        else:
            self.step_s += STEP_TIME_ALPHA * (seconds - self.step_s)

    def load(self) -> dict[str, float | int]:
        kv = self.kv
        return {
            "step_s": round(self.step_s, 6),
            "max_num_seqs": self.scheduler.config.max_num_seqs,
            "waiting": self.num_waiting,
            "running": self.num_running,
            "kv_usage": round(kv.usage, 6),
            "kv_blocks_free": kv.num_free_blocks,
            "kv_blocks_total": kv.num_blocks,
            "block_size": kv.block_size,
            "prefix_hit_rate": round(kv.prefix_hit_rate, 6),
            "prefix_cache_queries": kv.prefix_queries,
            "prefix_cache_hits": kv.prefix_hits,
            "kv_reservations": len(self.reservations),
            "kv_reservations_received_tokens": self.reservations.received_tokens(),
        }


def _timeline(seq: Sequence) -> Timeline:
    return Timeline(
        arrival=seq.arrival_time,
        scheduled=seq.scheduled_time,
        first_token=seq.first_token_time,
        finished=time.monotonic(),
        prefill_chunks=seq.num_prefill_chunks,
        cached_tokens=seq.num_cached_tokens,
        preemptions=seq.num_preemptions,
    )
