"""The heap trimmer: only large requests trigger a trim, and trims close together coalesce."""

from __future__ import annotations

import asyncio

from microserve.server.heap import LARGE_BODY_BYTES, HeapTrimmer


async def test_large_requests_trigger_one_coalesced_trim() -> None:
    trimmer = HeapTrimmer(delay_s=0.01)
    done = asyncio.Event()
    calls: list[int] = []

    def trim(pad: int) -> int:
        calls.append(pad)
        done.set()
        return 1

    trimmer._trim = trim
    trimmer.request_done(LARGE_BODY_BYTES - 1)
    assert trimmer._pending is None  # a small request frees little: no trim
    trimmer.request_done(LARGE_BODY_BYTES)
    trimmer.request_done(10 * LARGE_BODY_BYTES)
    await asyncio.wait_for(done.wait(), 10)
    assert calls == [0] and trimmer.trims == 1
    trimmer.request_done(LARGE_BODY_BYTES)  # a later one is trimmed after again
    assert trimmer._pending is not None
