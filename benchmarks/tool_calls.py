"""What reading tool calls adds to a streamed chat answer, per token, timed in process (best of 5):

- engine: one chat delta chunk built and framed (`ChatShape.delta_chunk` + `frame`), the peer, beside
  the same with the chunk rewritten by `ChatToolCalls` (hermes syntax), for a plain-text answer and for
  an answer that is one `<tool_call>`;
- router: `SSEToolCalls.feed` over the answer's SSE frames (decode, rewrite, encode), beside the
  continuation tracker's own per-frame work on the same frames (`StreamProgress.track`), the peer.

Usage: python benchmarks/tool_calls.py [--tokens 400]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import timeit
from collections.abc import Callable

from microserve.api.shapes import ChatShape
from microserve.api.sse import frame
from microserve.api.tool_calls import ChatToolCalls, SSEToolCalls
from microserve.machine import describe_machine
from microserve.router.continuation import StreamProgress
from microserve.router.request import Route, RoutedRequest

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
TEXT = "The weather in Paris is mild today, with a light breeze and a few clouds in the afternoon. "


def pieces(text: str, tokens: int) -> list[str]:
    """`text` repeated and cut into `tokens` pieces of about 4 characters (a token's text)."""
    whole = (text * (tokens * 4 // len(text) + 1))[: tokens * 4]
    return [whole[i : i + 4] for i in range(0, len(whole), 4)]


def engine_answer(deltas: list[str], tools: bool) -> Callable[[], None]:
    def run() -> None:
        shape = ChatShape(model="m", tool_calls=ChatToolCalls("hermes") if tools else None)
        for i, text in enumerate(deltas):
            chunk = shape.delta_chunk(0, text, [i])
            for c in shape.rewrite(chunk):
                frame(c)
        for c in shape.rewrite(shape.finish_chunk(0, "stop", None)):
            frame(c)

    return run


def sse_frames(deltas: list[str]) -> list[bytes]:
    shape = ChatShape(model="m")
    return [frame(shape.delta_chunk(0, t, [])) for t in deltas] + [frame(shape.finish_chunk(0, "stop", None))]


def router_rewrite(frames: list[bytes]) -> Callable[[], None]:
    def run() -> None:
        sse = SSEToolCalls(ChatToolCalls("hermes"))
        for f in frames:
            sse.feed(f)

    return run


def router_track(frames: list[bytes]) -> Callable[[], None]:
    req = RoutedRequest.parse(Route.CHAT, b'{"messages": [{"role": "user", "content": "x"}], "stream": true}')

    def run() -> None:
        progress = StreamProgress.for_request(req)
        for f in frames:
            progress.track(f[:-2])

    return run


def per_token_us(fn: Callable[[], None], tokens: int) -> float:
    return min(timeit.repeat(fn, number=20, repeat=5)) / 20 / tokens * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=400)
    args = parser.parse_args()
    n = args.tokens
    plain, call = pieces(TEXT, n), pieces(CALL, n)
    rows = {
        "engine: chunk + frame, no tools (peer)": per_token_us(engine_answer(plain, False), n),
        "engine: + ChatToolCalls, text answer": per_token_us(engine_answer(plain, True), n),
        "engine: + ChatToolCalls, tool-call answer": per_token_us(engine_answer(call, True), n),
        "router: StreamProgress.track per frame (peer)": per_token_us(router_track(sse_frames(plain)), n),
        "router: SSEToolCalls.feed, text answer": per_token_us(router_rewrite(sse_frames(plain)), n),
        "router: SSEToolCalls.feed, tool-call answer": per_token_us(router_rewrite(sse_frames(call)), n),
    }
    engine_peer = rows["engine: chunk + frame, no tools (peer)"]
    router_peer = rows["router: StreamProgress.track per frame (peer)"]
    print(f"# tool-call reading per streamed token, {n} tokens; {describe_machine()}; {dt.date.today()}")
    for name, us in rows.items():
        peer = engine_peer if name.startswith("engine") else router_peer
        print(f"{name:50s} {us:7.2f} us/token  x{us / peer:.2f} of its peer")
    print(json.dumps({k: round(v, 3) for k, v in rows.items()}))


if __name__ == "__main__":
    main()
