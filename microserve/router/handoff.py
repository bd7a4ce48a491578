"""Prefix hand-off: before an engine leaves the fleet, its hottest cached prefixes move to a survivor.

One implementation over the microserving verbs, driven by `serve`'s fleet (engines over HTTP) and by the
simulator (replicas on the virtual clock, the transfer's modelled time included): the leaving engine lists
its hottest prefixes (`/microserving/prefixes`), and for each the survivor reserves what it lacks
(`prep_recv`), the leaving engine pushes it (`remote_send`), and the survivor lets the reservation go
(`release`), which keeps the received KV in its prefix cache. Bounded by tokens (the bytes are tokens
times the model's KV bytes per token) and by time; a failure or the time running out ends the hand-off
early and never holds up the scale-down. The router's prefix index then points the moved prefixes at the
survivor (`Policy.handed_off`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from microserve.engine_client import EngineClient, EngineError, KVAddress
from microserve.http.client import ClientError

log = logging.getLogger(__name__)


class HandoffPeer(Protocol):
    """An engine, as the hand-off uses it."""

    url: str

    async def hot_prefixes(self, max_tokens: int, limit: int) -> list[list[int]]: ...
    async def prep_recv(self, request_id: str, prompt_ids: list[int]) -> KVAddress: ...
    async def remote_send(
        self, request_id: str, prompt_ids: list[int], addr: KVAddress, dst: HandoffPeer
    ) -> tuple[int, int]: ...
    async def release(self, request_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class HandoffConfig:
    """How much one hand-off may move: `max_tokens` in all, at most `max_prefixes` prefixes, within
    `budget_s` seconds."""

    max_tokens: int = 8192
    max_prefixes: int = 32
    budget_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_prefixes < 1 or self.budget_s <= 0:
            raise ValueError("a hand-off needs max tokens >= 1, max prefixes >= 1 and a budget > 0 s")


@dataclass(slots=True)
class HandoffResult:
    """What moved: the prefixes now held by the survivor (token ids), tokens and bytes sent, how long."""

    src: str
    dst: str
    prefixes: list[list[int]] = field(default_factory=list)
    sent_tokens: int = 0
    sent_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None  # why it ended early, if it did

    def describe(self) -> str:
        end = f"; stopped early: {self.error}" if self.error else ""
        return (
            f"{len(self.prefixes)} prefixes ({self.sent_tokens} tokens, {self.sent_bytes} bytes) "
            f"from {self.src} to {self.dst} in {self.seconds:.2f} s{end}"
        )


# What a peer's verbs raise when the engine refuses or cannot be reached: ends the hand-off, not the fleet.
PEER_ERRORS: tuple[type[BaseException], ...] = (EngineError, ClientError, OSError, ValueError, RuntimeError)


async def hand_off(
    src: HandoffPeer,
    dst: HandoffPeer,
    config: HandoffConfig,
    clock: Callable[[], float] = time.monotonic,
    errors: tuple[type[BaseException], ...] = PEER_ERRORS,
) -> HandoffResult:
    """Move `src`'s hottest prefixes to `dst` (see the module); never raises for a peer's failure."""
    result = HandoffResult(src.url, dst.url)
    start = clock()
    try:
        async with asyncio.timeout(config.budget_s):
            found = await src.hot_prefixes(config.max_tokens, config.max_prefixes)
            for ids in found:
                await _move(src, dst, ids, result)
    except TimeoutError:
        result.error = f"the {config.budget_s:g} s budget ran out"
    except errors as exc:
        result.error = str(exc) or type(exc).__name__
    result.seconds = clock() - start
    return result


async def _move(src: HandoffPeer, dst: HandoffPeer, ids: list[int], result: HandoffResult) -> None:
    request_id = f"handoff-{uuid.uuid4().hex[:12]}"
    addr = await dst.prep_recv(request_id, ids)
    try:
        if addr.matched < len(ids):
            tokens, size = await src.remote_send(request_id, ids, addr, dst)
            result.sent_tokens += tokens
            result.sent_bytes += size
    finally:
        # Shielded: a hand-off cut short by its budget still lets the survivor's reservation go.
        await asyncio.shield(dst.release(request_id))
    result.prefixes.append(ids)


class EnginePeer:
    """A microserve engine over HTTP (its `EngineClient`), for `serve`'s fleet."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self.url = client.url

    async def hot_prefixes(self, max_tokens: int, limit: int) -> list[list[int]]:
        return await self.client.hot_prefixes(max_tokens, limit)

    async def prep_recv(self, request_id: str, prompt_ids: list[int]) -> KVAddress:
        return await self.client.prep_recv(request_id, prompt_ids)

    async def remote_send(
        self, request_id: str, prompt_ids: list[int], addr: KVAddress, dst: HandoffPeer
    ) -> tuple[int, int]:
        r = await self.client.remote_send(request_id, prompt_ids, addr, dst.url, begin=addr.matched)
        return int(r["sent_tokens"]), int(r["bytes"])

    async def release(self, request_id: str) -> bool:
        return await self.client.release(request_id)
