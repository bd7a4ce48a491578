"""The router's relay of a stream it does not track: the bytes pass through as read, and the stream ends
well only when its last 32 bytes hold [DONE], however the reads split them."""

from __future__ import annotations

import pytest

from microserve.http.client import HTTPClient
from microserve.router.upstream import BrokenStream, HTTPWorkerHandle, Upstream
from microserve.router.workers import Worker, WorkerKind, WorkerSpec

STREAM = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'


class Reads:
    """A response whose body arrives in the given pieces (`read_chunk`, as `http.client.Response`)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def read_chunk(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def relayed(pieces: list[bytes]) -> tuple[bytes, Worker]:
    worker = Worker(WorkerSpec("http://127.0.0.1:9", kind=WorkerKind.OPENAI))
    handle = HTTPWorkerHandle(worker, Upstream(http=HTTPClient(), control=HTTPClient()))
    chunks = handle._chunks(Reads(pieces), None, relay=True)  # type: ignore[arg-type]
    out = [data async for data in chunks]
    return b"".join(out), worker


@pytest.mark.parametrize("size", [1, 3, 7, 31, 32, 33, 1000])
async def test_a_stream_ends_well_with_done_however_the_reads_split_it(size: int) -> None:
    body, worker = await relayed(split(STREAM, size))
    assert body == STREAM and not worker.errors


@pytest.mark.parametrize("size", [1, 5, 32, 1000])
async def test_a_stream_without_done_at_its_end_is_broken(size: int) -> None:
    cut = STREAM[: -len(b"[DONE]\n\n")]
    with pytest.raises(BrokenStream, match="without \\[DONE\\]"):
        await relayed(split(cut, size))
    padded = STREAM + b"data: " + b"x" * 40 + b"\n\n"  # [DONE], then more than 32 bytes of another event
    with pytest.raises(BrokenStream, match="without \\[DONE\\]"):
        await relayed(split(padded, size))
