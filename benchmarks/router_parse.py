"""The router's per-request parse cost, timed in process: `RoutedRequest.parse` (JSON decode, the shared
API layer's strict validation, the routing fields) for four bodies: a short chat, a completion, a chat with
tools, a chat asking for structured output (a JSON schema). Each figure is the median over `--repeat`
rounds of `--number` calls, in CPU time (on a shared machine, time spent waiting for a core is not the
parse's); the peer in the same run is `orjson.loads` of the same body (the floor any parse pays).

Usage: python benchmarks/router_parse.py [--number 2000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
import timeit

import orjson

from microserve.machine import describe_machine
from microserve.router.request import Route, RoutedRequest

_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
}
_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris for the next three days?"},
]
BODIES: dict[str, tuple[Route, bytes]] = {
    "chat": (
        Route.CHAT,
        orjson.dumps({"model": "mock", "messages": _MESSAGES, "max_tokens": 64, "temperature": 0.7}),
    ),
    "completions": (
        Route.COMPLETIONS,
        orjson.dumps({"model": "mock", "prompt": "Once upon a time", "max_tokens": 64, "stream": True}),
    ),
    "tools": (
        Route.CHAT,
        orjson.dumps(
            {
                "model": "mock",
                "messages": _MESSAGES,
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": name, "description": f"The {name}.", "parameters": _SCHEMA},
                    }
                    for name in ("get_weather", "get_forecast", "get_time")
                ],
                "tool_choice": "auto",
                "max_tokens": 128,
            }
        ),
    ),
    "structured": (
        Route.CHAT,
        orjson.dumps(
            {
                "model": "mock",
                "messages": _MESSAGES,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "forecast", "schema": _SCHEMA, "strict": True},
                },
                "max_tokens": 128,
            }
        ),
    ),
}
HEADERS = {"content-type": "application/json", "x-session-id": "s-1"}


def median_us(fn: object, number: int, repeat: int) -> float:
    # CPU time of this process: on a shared machine, time spent waiting for a core is not the parse's.
    times = timeit.repeat(fn, number=number, repeat=repeat, timer=time.process_time)  # type: ignore[arg-type]
    return statistics.median(times) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--number", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    print(f"# router parse cost per request — {dt.date.today().isoformat()}, {describe_machine()}")
    print(f"# load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| body | bytes | orjson.loads µs (peer) | RoutedRequest.parse µs | parse / loads |")
    print("|---|---|---|---|---|")
    for name, (route, raw) in BODIES.items():
        RoutedRequest.parse(route, raw, HEADERS)  # warm up (and fail loudly if the body is refused)
        floor = median_us(lambda raw=raw: orjson.loads(raw), args.number, args.repeat)
        parse = median_us(
            lambda route=route, raw=raw: RoutedRequest.parse(route, raw, HEADERS), args.number, args.repeat
        )
        print(f"| {name} | {len(raw)} | {floor:.2f} | {parse:.1f} | {parse / floor:.0f}x |")


if __name__ == "__main__":
    main()
