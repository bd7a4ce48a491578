"""The KV send loop, written once: a prefill's exported pieces pushed to the receiver one by one.

The engine's remote_send drives it with an HTTP push on the wall clock, the simulator's replicas with an
in-process import on the virtual clock; each injects its push and sleep through the constructor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from microserve.engine.outputs import KVPiece, PrefillProgress

Push = Callable[[KVPiece], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


def send_id(request_id: str) -> str:
    """The sending prefill's own id: the same engine may hold the receiving reservation under `request_id`."""
    return f"{request_id}/send"


class PrefillEnded(RuntimeError):
    """The prefill's stream ended before its finished progress (the engine lost it)."""


@dataclass(frozen=True, slots=True)
class SentKV:
    tokens: int
    bytes: int


@dataclass(frozen=True, slots=True)
class KVSender:
    """Pushes each exported piece after its modelled transfer time (0 on a real engine), in order.

    Each prefill chunk's pieces leave while the next chunk computes. `on_progress` sees every progress
    before its pieces are pushed (the engine's trace span records the export).
    """

    push: Push
    transfer_time: Callable[[int], float]
    sleep: Sleep = asyncio.sleep
    on_progress: Callable[[PrefillProgress], None] | None = None

    async def send(self, prefill: AsyncGenerator[PrefillProgress, None]) -> SentKV:
        """Drive `prefill` to its end (closed, so aborted, on any failure); the tokens and bytes sent."""
        sent = size = 0
        async with aclosing(prefill):
            async for progress in prefill:
                if self.on_progress is not None:
                    self.on_progress(progress)
                for piece in progress.payloads:
                    await self.sleep(self.transfer_time(piece.num_tokens))
                    await self.push(piece)
                    sent += piece.num_tokens
                    size += len(piece.data)
                if progress.finished:
                    return SentKV(sent, size)
        raise PrefillEnded("the prefill's stream ended before it finished")
