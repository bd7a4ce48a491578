"""Benchmark workloads: each turns a seed into a deterministic stream of requests to send.

Random lengths, multi-turn conversations over shared system prompts, and long shared documents with several
questions each (prefix-heavy); a user's JSONL trace is in `trace.py`."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass, replace
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

Message = dict[str, str]


class Endpoint(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self is Endpoint.CHAT else "/v1/completions"


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request to send: a completions `prompt` (text or token ids) or chat `messages`, never both."""

    index: int
    expected_output_len: int
    prompt: str | list[int] | None = None
    messages: tuple[Message, ...] | None = None
    # Exact only for token-id prompts; text prompts are measured by the server's usage report instead.
    prompt_len: int | None = None
    conversation: int | None = None  # multi-turn: its conversation; shared-doc: its document
    turn: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a request carries exactly one of prompt and messages")
        if self.expected_output_len < 1:
            raise ValueError(f"expected_output_len must be positive, got {self.expected_output_len}")

    def api_input(self, endpoint: Endpoint) -> dict[str, Any]:
        """The request body's input field(s) for `endpoint`."""
        if endpoint is Endpoint.COMPLETIONS:
            if self.prompt is None:
                raise ValueError("chat messages need --endpoint chat (a template renders them server-side)")
            return {"prompt": self.prompt}
        if self.messages is not None:
            return {"messages": list(self.messages)}
        if not isinstance(self.prompt, str):
            raise ValueError("token-id prompts need --endpoint completions")
        return {"messages": [{"role": "user", "content": self.prompt}]}


class RequestSource(Protocol):
    """What the runner draws from: requests in order, some of which wait for an earlier answer."""

    def next_ready(self) -> BenchRequest | None:
        """A request that may go now, or None when the next one waits for an answer (or none is left)."""

    def complete(self, request: BenchRequest, answer: str | None) -> None:
        """`request` finished with the model's `answer` text, or failed (None)."""

    @property
    def exhausted(self) -> bool:
        """Nothing more will ever be ready."""

    @property
    def skipped(self) -> int:
        """Requests that will never be sent because one they depend on failed."""


@dataclass(slots=True)
class IndexedSource:
    """Requests that depend on nothing: request i is `make(i)`, for i below `limit` (None: no end)."""

    make: Callable[[int], BenchRequest]
    limit: int | None
    issued: int = 0
    skipped: int = 0

    def next_ready(self) -> BenchRequest | None:
        if self.exhausted:
            return None
        self.issued += 1
        return self.make(self.issued - 1)

    def complete(self, request: BenchRequest, answer: str | None) -> None:
        pass

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.issued >= self.limit


class Workload(ABC):
    """A family of requests; `source(limit)` hands out the first `limit` of them (or an endless stream)."""

    name: str

    @property
    def endpoints(self) -> frozenset[Endpoint]:
        """The endpoints the workload's requests can be sent to (a subclass narrows them)."""
        return frozenset(Endpoint)

    def check_endpoint(self, endpoint: Endpoint) -> None:
        if endpoint not in self.endpoints:
            allowed = " or ".join(sorted(e.value for e in self.endpoints))
            raise ValueError(f"the {self.name} workload needs --endpoint {allowed}")

    @property
    def natural_count(self) -> int | None:
        """How many requests the workload holds when no count or duration is asked (a trace's lines)."""
        return None

    def source(self, limit: int | None) -> RequestSource:
        return IndexedSource(self.request, limit)

    @abstractmethod
    def request(self, index: int) -> BenchRequest:
        """Request `index`, the same for the same seed whatever order the requests are made in."""

    def for_run(self, run: int) -> Workload:
        """The workload of a sweep's `run`-th run: the same shape with fresh prompts, so no run is served
        from the prefix cache that an earlier run warmed. Run 0 is this workload itself."""
        seed = getattr(self, "seed", None)
        if run == 0 or seed is None:
            return self
        derived = int(np.random.SeedSequence([seed, run]).generate_state(1)[0])
        if not is_dataclass(self):
            raise TypeError(f"{type(self).__name__} has a seed but is not a dataclass to copy with another")
        return replace(self, seed=derived)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


# Common English words that are one token each (with their leading space) in the usual BPE vocabularies,
# so a prompt of n words is close to n tokens; the exact count comes back in the server's usage report.
_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their can has been if more when will would who so no time "
    "out up about into than them only other new some could these two may first then do any like my now "
    "over such our man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state good very make world "
    "still own see men work long here get both between life being under never day same another know while "
    "last might us great old year off come since against go came right used take three place small found"
)
WORDS = tuple(_WORD_TEXT.split())


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A generator for one item: keyed by the item, not by how many draws came before it."""
    return np.random.default_rng([seed, *keys])


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n))


def ranged_len(rng: np.random.Generator, mean: int, range_ratio: float) -> int:
    """A length uniform in [mean*(1-r), mean*(1+r)] as vLLM's random dataset draws it, at least 1."""
    low, high = math.floor(mean * (1 - range_ratio)), math.ceil(mean * (1 + range_ratio))
    return max(1, int(rng.integers(low, high + 1)))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")


# Keys that separate the random streams of different kinds of items under one seed.
_REQUEST, _SYSTEM, _TURN, _DOCUMENT, _QUESTION = range(5)


@dataclass(frozen=True, slots=True)
class RandomWorkload(Workload):
    """Independent prompts of random words (or token ids) with random input and output lengths."""

    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    token_ids: bool = False
    seed: int = 0
    # Ids well inside every common vocabulary (32k Llama to 150k Qwen) and past their special tokens.
    token_id_range: tuple[int, int] = (1000, 10000)
    name = "random"

    def __post_init__(self) -> None:
        _check_positive(input_len=self.input_len, output_len=self.output_len)
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range ratio must be in [0, 1), got {self.range_ratio}")

    @property
    def endpoints(self) -> frozenset[Endpoint]:
        return frozenset({Endpoint.COMPLETIONS}) if self.token_ids else frozenset(Endpoint)

    def check_endpoint(self, endpoint: Endpoint) -> None:
        if endpoint not in self.endpoints:
            raise ValueError("--prompt-format token-ids needs --endpoint completions")

    def request(self, index: int) -> BenchRequest:
        rng = rng_for(self.seed, _REQUEST, index)
        n_in = ranged_len(rng, self.input_len, self.range_ratio)
        n_out = ranged_len(rng, self.output_len, self.range_ratio)
        if self.token_ids:
            ids = rng.integers(*self.token_id_range, size=n_in).tolist()
            return BenchRequest(index, n_out, prompt=ids, prompt_len=n_in)
        return BenchRequest(index, n_out, prompt=words(rng, n_in))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_len": self.input_len,
            "output_len": self.output_len,
            "range_ratio": self.range_ratio,
            "prompt_format": "token-ids" if self.token_ids else "text",
            "seed": self.seed,
        }


@dataclass(frozen=True, slots=True)
class MultiTurnWorkload(Workload):
    """Conversations of `turns` turns, each opening with one of `system_prompts` shared system prompts.

    A turn is sent only after the previous answer arrived, and carries the whole history, the model's
    real answers included, as a chat client would. Request budget n makes ceil(n / turns) conversations.
    """

    turns: int = 4
    system_prompts: int = 2
    system_prompt_len: int = 256
    turn_len: int = 32
    output_len: int = 64
    seed: int = 0
    name = "multi-turn"
    endpoints = frozenset({Endpoint.CHAT})

    def __post_init__(self) -> None:
        _check_positive(
            turns=self.turns,
            system_prompts=self.system_prompts,
            system_prompt_len=self.system_prompt_len,
            turn_len=self.turn_len,
            output_len=self.output_len,
        )

    def system_prompt(self, conversation: int) -> str:
        k = conversation % self.system_prompts
        return f"You are assistant {k}. " + words(rng_for(self.seed, _SYSTEM, k), self.system_prompt_len)

    def user_message(self, conversation: int, turn: int) -> str:
        return words(rng_for(self.seed, _TURN, conversation, turn), self.turn_len)

    def source(self, limit: int | None) -> ConversationSource:
        return ConversationSource(self, limit)

    def request(self, index: int) -> BenchRequest:
        """The opening turn of conversation `index` (later turns need answers: see `source`)."""
        return self.turn_request(index, conversation=index, history=(), turn=0)

    def turn_request(
        self, index: int, conversation: int, history: tuple[Message, ...], turn: int
    ) -> BenchRequest:
        if not history:
            history = ({"role": "system", "content": self.system_prompt(conversation)},)
        messages = (*history, {"role": "user", "content": self.user_message(conversation, turn)})
        return BenchRequest(index, self.output_len, messages=messages, conversation=conversation, turn=turn)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "turns": self.turns,
            "system_prompts": self.system_prompts,
            "system_prompt_len": self.system_prompt_len,
            "turn_len": self.turn_len,
            "output_len": self.output_len,
            "seed": self.seed,
        }


@dataclass(slots=True)
class _Conversation:
    number: int
    turns: int
    history: tuple[Message, ...] = ()
    sent: int = 0


def _conversation_of(request: BenchRequest) -> int:
    if request.conversation is None:
        raise ValueError(f"request {request.index} belongs to no conversation")
    return request.conversation


@dataclass(slots=True)
class ConversationSource:
    """Hands out turns: a ready follow-up first (its user is waiting), else the opening of a new one."""

    workload: MultiTurnWorkload
    limit: int | None
    issued: int = 0
    skipped: int = 0
    started: int = 0
    ready: deque[BenchRequest] = field(default_factory=deque)
    awaiting: dict[int, _Conversation] = field(default_factory=dict)

    def _turns_of(self, conversation: int) -> int:
        turns = self.workload.turns
        if self.limit is None:
            return turns
        return min(turns, self.limit - conversation * turns)

    def _can_start(self) -> bool:
        return self.limit is None or self.started * self.workload.turns < self.limit

    def next_ready(self) -> BenchRequest | None:
        if self.ready:
            request = replace(self.ready.popleft(), index=self.issued)
        elif self._can_start():
            number = self.started
            self.started += 1
            self.awaiting[number] = _Conversation(number, self._turns_of(number))
            request = self.workload.turn_request(self.issued, number, (), 0)
        else:
            return None
        self.awaiting[_conversation_of(request)].sent += 1
        self.issued += 1
        return request

    def complete(self, request: BenchRequest, answer: str | None) -> None:
        conv = self.awaiting.pop(_conversation_of(request))
        if answer is None:
            # The history would be wrong without the answer: the rest of this conversation is dropped.
            self.skipped += conv.turns - conv.sent
            return
        if conv.sent == conv.turns:
            return
        assert request.messages is not None
        conv.history = (*request.messages, {"role": "assistant", "content": answer})
        self.awaiting[conv.number] = conv
        self.ready.append(self.workload.turn_request(-1, conv.number, conv.history, conv.sent))

    @property
    def exhausted(self) -> bool:
        return not self.ready and not self.awaiting and not self._can_start()


@dataclass(frozen=True, slots=True)
class SharedDocWorkload(Workload):
    """`documents` long documents, each asked `questions` questions in a row: most of a prompt is shared.

    Request i asks about document (i // questions) % documents; its question is its own (keyed by i), so
    only the document prefix repeats, as in document question answering.
    """

    documents: int = 4
    document_len: int = 1024
    questions: int = 4
    question_len: int = 16
    output_len: int = 64
    seed: int = 0
    name = "shared-doc"

    def __post_init__(self) -> None:
        _check_positive(
            documents=self.documents,
            document_len=self.document_len,
            questions=self.questions,
            question_len=self.question_len,
            output_len=self.output_len,
        )

    def document(self, number: int) -> str:
        return words(rng_for(self.seed, _DOCUMENT, number), self.document_len)

    def request(self, index: int) -> BenchRequest:
        doc = (index // self.questions) % self.documents
        question = words(rng_for(self.seed, _QUESTION, index), self.question_len)
        prompt = (
            f"Read the document, then answer the question.\n\n{self.document(doc)}\n\nQuestion: {question}"
        )
        return BenchRequest(index, self.output_len, prompt=prompt, conversation=doc)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "documents": self.documents,
            "document_len": self.document_len,
            "questions": self.questions,
            "question_len": self.question_len,
            "output_len": self.output_len,
            "seed": self.seed,
        }
