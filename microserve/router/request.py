"""One client request as the router carries it: the body as received (forwarded untouched when possible),
the few fields routing needs, and the prompt's token ids computed only if a strategy or policy asks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

import orjson

from microserve.api.errors import bad_request
from microserve.api.plain_check import PlainCheck, message_check, non_empty_list, non_empty_str
from microserve.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    RequestModel,
    parse_request,
)
from microserve.router.recent import Hop, plain_hop, token_counts

SESSION_HEADER = "x-session-id"  # header names arrive in lower case


class Route(StrEnum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"


# Tokenizes a request for a model: (model, route, body) -> prompt ids. Set by the router.
PromptTokenizer = Callable[[str | None, Route, Mapping[str, Any]], list[int]]


def _no_tokenizer(model: str | None, route: Route, body: Mapping[str, Any]) -> list[int]:
    raise LookupError("this router has no tokenizer for prompt ids")


# Each route's request model, and the quick check derived from it that passes the plain requests (most of
# them) without building the model (api/plain_check.py).
_MODELS: dict[Route, tuple[type[RequestModel], PlainCheck]] = {
    Route.CHAT: (
        ChatCompletionRequest,
        PlainCheck(
            ChatCompletionRequest,
            {"messages": non_empty_list(message_check(ChatMessage))},
            {"messages": [{"role": "user", "content": "Hi."}]},
        ),
    ),
    Route.COMPLETIONS: (
        CompletionRequest,
        PlainCheck(CompletionRequest, {"prompt": non_empty_str}, {"prompt": "Hi."}),
    ),
}


class RoutedRequest:
    """A validated client request; policies and strategies read it, the proxy forwards `raw` or a variant."""

    __slots__ = (
        "_clock",
        "_id",
        "_prefix",
        "_prompt_ids",
        "_tokenize",
        "body",
        "cached_tokens",
        "deadline",
        "excluded",
        "handles",
        "hops",
        "model",
        "output_tokens",
        "priority",
        "raw",
        "route",
        "session_key",
        "stream",
        "trace",
        "usage",
        "wants_token_ids",
    )

    def __init__(
        self,
        route: Route,
        body: dict[str, Any],
        raw: bytes,
        *,
        session_key: str | None = None,
        timeout_s: float = 600.0,
        tokenize: PromptTokenizer = _no_tokenizer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.route = route
        self.body = body
        self.raw = raw
        self.model: str | None = body.get("model")
        self.stream: bool = bool(body.get("stream"))
        self.session_key = session_key
        self.wants_token_ids = bool(body.get("return_token_ids"))
        self._id: str | None = None
        self._clock = clock  # the simulator's requests run on its virtual clock
        self.deadline = clock() + timeout_s
        self.excluded: set[str] = set()  # workers that failed this request: retries go elsewhere
        self.handles: list[Any] = []  # every worker picked for it, released when it ends
        # Its way through the fleet and its token counts, as far as the router sees them (for /dashboard).
        self.hops: list[Hop] = []
        self.output_tokens: int | None = None  # a stream's, counted by its relay
        self.usage: bytes | None = None  # a whole answer's usage, unparsed (`token_counts`)
        # Sent to microserve engines (their scheduler's order) when set: the tenant's priority class.
        self.priority: int | None = None
        self.cached_tokens: int | None = None
        self.trace: Any = None  # a RequestTrace (router/tracing.py) when tracing is on
        self._tokenize = tokenize
        self._prompt_ids: list[int] | None = None
        self._prefix: str | list[int] | None = None

    @classmethod
    def parse(
        cls,
        route: Route,
        raw: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        timeout_s: float = 600.0,
        tokenize: PromptTokenizer = _no_tokenizer,
    ) -> RoutedRequest:
        """Check what routing relies on (4xx otherwise); the rest is the worker's to judge."""
        if not raw:
            raise bad_request("The request body is empty; send a JSON object.")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"The request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.")
        # The engine's own request model: what the engine would refuse, the router refuses the same way
        # (sampling ranges excepted: the engine's 400 for those comes back to the client unchanged).
        model, plain = _MODELS[route]
        if not plain.passes(body):
            parse_request(model, body, ranges=False)
        session = headers.get(SESSION_HEADER) if headers is not None else None
        user = body.get("user")
        return cls(
            route,
            body,
            raw,
            session_key=session or (user if isinstance(user, str) and user else None),
            timeout_s=timeout_s,
            tokenize=tokenize,
        )

    @property
    def id(self) -> str:
        """A unique id for this request (for the microserving verbs, logs); made on first use."""
        if self._id is None:
            self._id = uuid.uuid4().hex
        return self._id

    def note(self, verb: str, worker: str, tokens: int | None = None, nbytes: int | None = None) -> None:
        """Record a call a strategy made for this request (shown on /dashboard, counted in /metrics)."""
        plain = tokens is None and nbytes is None
        self.hops.append(plain_hop(verb, worker) if plain else Hop(verb, worker, tokens, nbytes))

    @property
    def known_prompt_tokens(self) -> int | None:
        """The prompt's length in tokens if it was tokenized (a strategy or policy asked), else None."""
        return None if self._prompt_ids is None else len(self._prompt_ids)

    def token_counts(self) -> tuple[int | None, int | None]:
        """(output tokens, cached prompt tokens) as far as the router saw them."""
        return token_counts(self.output_tokens, self.cached_tokens, self.usage)

    @property
    def known_id(self) -> str | None:
        """The request's id if one was made (microserving verbs use it), else None."""
        return self._id

    def remaining_s(self) -> float:
        return self.deadline - self._clock()

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt's token ids as the engine will see them; tokenized on first use, then cached."""
        if self._prompt_ids is None:
            self._prompt_ids = self._tokenize(self.model, self.route, self.body)
        return self._prompt_ids

    @prompt_ids.setter
    def prompt_ids(self, ids: list[int]) -> None:
        self._prompt_ids = ids

    @property
    def prefix(self) -> str | list[int]:
        """The prompt as text (or ids, if sent as ids), for prefix-aware routing without a tokenizer."""
        if self._prefix is None:
            self._prefix = _prefix_of(self.route, self.body)
        return self._prefix

    def upstream_body(self, **overrides: Any) -> bytes:
        """The body to send a worker: the client's bytes when nothing changes, else re-encoded."""
        if not overrides:
            return self.raw
        return orjson.dumps({**self.body, **overrides})

    @property
    def batched(self) -> bool:
        """A completion request with several prompts (served whole by one worker)."""
        prompt = self.body.get("prompt")
        return isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], str | list)

    @property
    def served_whole(self) -> bool:
        """Served by one worker whatever the strategy: a batch of prompts, or one that asks for the
        prompt's logprobs (a decode engine that received the prompt's KV never saw its logits)."""
        prompt_logprobs = self.body.get("prompt_logprobs") is not None or (
            self.body.get("echo") and self.body.get("logprobs") is not None
        )
        return self.batched or bool(prompt_logprobs)

    @property
    def choices(self) -> int:
        """How many choices the answer has (n, for each prompt of a batch)."""
        n = int(self.body.get("n") or 1)
        return n * len(self.body["prompt"]) if self.batched else n

    @property
    def max_tokens(self) -> int | None:
        if self.route is Route.CHAT:
            value: int | None = self.body.get("max_completion_tokens")
            return value if value is not None else self.body.get("max_tokens")
        # OpenAI's completions default is 16 when max_tokens is absent; null means "the rest of the context".
        given: int | None = self.body.get("max_tokens", 16)
        return given


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prefix_of(route: Route, body: Mapping[str, Any]) -> str | list[int]:
    if route is Route.COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
            return prompt
        return orjson.dumps(prompt).decode()
    # Role markers keep "user: ab" apart from "user: a" + "user: b"; cheaper than rendering the template.
    parts = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<|{message.get('role')}|>{content or ''}\n")
    return "".join(parts)
