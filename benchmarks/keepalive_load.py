"""Send exactly N chat requests over C keep-alive connections and check each is answered 200 (a fixed
amount of work, for `router_instructions.sh`; wrk runs for a time instead).

Usage: python benchmarks/keepalive_load.py PORT N C [--wait SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

BODY = b'{"model":"mock","messages":[{"role":"user","content":"Say hi."}],"max_tokens":8}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


async def connection(port: int, n: int, failed: list[bytes]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(n):
        writer.write(REQUEST)
        status = await reader.readline()
        length = 0
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        if b" 200 " not in status:
            failed.append(status.strip())
    writer.close()


async def up(port: int, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            await connection(port, 1, [])
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
    args = ap.parse_args()
    if args.wait:
        await up(args.port, args.wait)
    failed: list[bytes] = []
    await asyncio.gather(*(connection(args.port, args.n // args.c, failed) for _ in range(args.c)))
    if failed:
        sys.exit(f"{len(failed)} of {args.n} requests failed, e.g. {failed[0].decode()}")


if __name__ == "__main__":
    asyncio.run(main())
