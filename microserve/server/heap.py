"""Give the memory of a large request back to the operating system once it is over.

A long prompt costs far more than its body while it is tokenized (the tokenizer's encoding, the id list),
on a worker thread whose glibc arena keeps what is freed: without a trim, one rejected 1 MB prompt
leaves the engine 50 MB larger for good (measured: tests/test_server_connections.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

LARGE_BODY_BYTES = 256 * 1024  # bodies above this are followed by a trim
TRIM_DELAY_S = 0.2  # after the request, so its objects are gone; trims coalesce within it


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """Calls glibc's `malloc_trim` (every arena, free pages returned) shortly after a large request
    ends, on a worker thread (ctypes lets go of the GIL, so the event loop goes on); no-op elsewhere."""

    def __init__(self, delay_s: float = TRIM_DELAY_S) -> None:
        self.delay_s = delay_s
        self.trims = 0
        self._trim = _malloc_trim()
        self._pending: asyncio.TimerHandle | None = None

    def request_done(self, body_bytes: int) -> None:
        if body_bytes < LARGE_BODY_BYTES or self._trim is None or self._pending is not None:
            return
        self._pending = asyncio.get_running_loop().call_later(self.delay_s, self._start)

    def _start(self) -> None:
        self._pending = None
        self.trims += 1
        assert self._trim is not None
        asyncio.get_running_loop().run_in_executor(None, self._trim, 0)
