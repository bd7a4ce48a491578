"""Send exactly N chat requests over C keep-alive connections and check each is answered 200 (a fixed
amount of work, for `router_instructions.sh`; wrk runs for a time instead). `--stream T` asks for streamed
answers of T tokens (the mock worker sends each token as its own chunk).

Usage: python benchmarks/keepalive_load.py PORT N C [--wait SECONDS] [--stream TOKENS]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from router_overhead import request_body  # the body wrk sends (this script's folder is on sys.path)


def request(stream_tokens: int) -> bytes:
    body = request_body(stream_tokens).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


async def read_body(reader: asyncio.StreamReader, length: int | None) -> bytes:
    if length is not None:
        return await reader.readexactly(length)
    parts = []  # chunked
    while size := int((await reader.readline()).split(b";")[0], 16):
        parts.append(await reader.readexactly(size))
        await reader.readline()
    await reader.readline()
    return b"".join(parts)


async def connection(port: int, n: int, req: bytes, failed: list[bytes]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(n):
        writer.write(req)
        status = await reader.readline()
        length = None
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await read_body(reader, length)
        if b" 200 " not in status or (b"stream" in req and not body.endswith(b"data: [DONE]\n\n")):
            failed.append(status.strip())
    writer.close()


async def up(port: int, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            await connection(port, 1, request(0), [])
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("port", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("c", type=int)
    ap.add_argument("--wait", type=float, default=0.0, help="wait this long for the router to answer")
    ap.add_argument("--stream", type=int, default=0, metavar="TOKENS", help="streamed answers of TOKENS")
    args = ap.parse_args()
    if args.wait:
        await up(args.port, args.wait)
    failed: list[bytes] = []
    req = request(args.stream)
    await asyncio.gather(*(connection(args.port, args.n // args.c, req, failed) for _ in range(args.c)))
    if failed:
        sys.exit(f"{len(failed)} of {args.n} requests failed, e.g. {failed[0].decode()}")


if __name__ == "__main__":
    asyncio.run(main())
