"""The KV send loop (`engine/kv_send.py`) on a scripted prefill, an in-memory push and a recorded sleep."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from microserve.engine.kv_send import KVSender, PrefillEnded, SentKV, send_id
from microserve.engine.outputs import KVPiece, PrefillProgress


def piece(begin: int, end: int) -> KVPiece:
    return KVPiece(begin, end, memoryview(bytes(10 * (end - begin))))


class Script:
    """A prefill that yields the given progress, noting whether it was closed before its end."""

    def __init__(self, steps: list[PrefillProgress], fail_at: int | None = None) -> None:
        self.steps = steps
        self.fail_at = fail_at
        self.closed_early = False

    async def run(self) -> AsyncGenerator[PrefillProgress, None]:
        done = False
        try:
            for i, step in enumerate(self.steps):
                if i == self.fail_at:
                    raise ValueError("the engine refused")
                done = step.finished
                yield step
        finally:
            self.closed_early = not done


def test_send_id_is_private_to_the_sender() -> None:
    assert send_id("r1") == "r1/send"


def test_pushes_every_piece_in_order_after_its_transfer_time() -> None:
    events: list[tuple[str, object]] = []
    progressed: list[int] = []

    async def push(p: KVPiece) -> None:
        events.append(("push", (p.begin, p.end)))

    async def sleep(s: float) -> None:
        events.append(("sleep", s))

    steps = [
        PrefillProgress("r/send", [], False),
        PrefillProgress("r/send", [piece(0, 4), piece(4, 8)], False),
        PrefillProgress("r/send", [piece(8, 10)], True),
    ]
    sender = KVSender(
        push, lambda n: n / 100, sleep, on_progress=lambda p: progressed.append(len(p.payloads))
    )
    script = Script(steps)
    result = asyncio.run(sender.send(script.run()))
    assert result == SentKV(tokens=10, bytes=100)
    assert events == [
        ("sleep", 0.04),
        ("push", (0, 4)),
        ("sleep", 0.04),
        ("push", (4, 8)),
        ("sleep", 0.02),
        ("push", (8, 10)),
    ]
    assert progressed == [0, 2, 1]
    assert not script.closed_early


def test_a_failed_push_closes_the_prefill() -> None:
    async def push(p: KVPiece) -> None:
        raise ConnectionError("receiver gone")

    script = Script([PrefillProgress("r/send", [piece(0, 4)], False), PrefillProgress("r/send", [], True)])
    with pytest.raises(ConnectionError):
        asyncio.run(KVSender(push, lambda n: 0.0).send(script.run()))
    assert script.closed_early


def test_the_engine_refusal_comes_through_unchanged() -> None:
    async def push(p: KVPiece) -> None:
        pass

    script = Script([PrefillProgress("r/send", [piece(0, 4)], False)] * 2, fail_at=1)
    with pytest.raises(ValueError, match="refused"):
        asyncio.run(KVSender(push, lambda n: 0.0).send(script.run()))
    assert script.closed_early


def test_a_stream_that_ends_unfinished_is_an_error() -> None:
    async def push(p: KVPiece) -> None:
        pass

    script = Script([PrefillProgress("r/send", [piece(0, 4)], False)])
    with pytest.raises(PrefillEnded):
        asyncio.run(KVSender(push, lambda n: 0.0).send(script.run()))
