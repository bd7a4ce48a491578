"""Argument parsing shared by the command lines: sizes, devices, and the HTTP server's connection limits."""

from __future__ import annotations

import argparse
import re
from dataclasses import replace

from microserve.http.limits import ConnectionLimits

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1GiB', '512M', '2g', '1048576' -> bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512MiB, 2GiB)")
    value, unit = float(m.group(1)), m.group(2).lower()
    return int(value * 1024 ** " kmgt".index(unit or " "))


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """Flags for `ConnectionLimits`, for any command that serves HTTP on microserve's server."""
    p.add_argument("--header-timeout", type=float, default=None, help="seconds for a request's headers (10)")
    p.add_argument("--body-timeout", type=float, default=None, help="seconds for a body, and see below (30)")
    p.add_argument(
        "--body-min-rate", type=parse_size, default=None, help="each such many bytes add 1 s to it (1KiB)"
    )
    p.add_argument("--keepalive-timeout", type=float, default=None, help="seconds a connection may idle (75)")
    p.add_argument(
        "--max-client-connections",
        type=int,
        default=None,
        help="client connections held at once (3/4 of the descriptor limit)",
    )
    p.add_argument(
        "--max-connections-per-client",
        type=int,
        default=None,
        help="connections held for one client address (half of --max-client-connections)",
    )


def connection_limits(args: argparse.Namespace, base: ConnectionLimits) -> ConnectionLimits:
    """`base` with the flags of `add_connection_args` that were given."""
    given = {
        name: value
        for name, value in (
            ("header_timeout_s", args.header_timeout),
            ("body_timeout_s", args.body_timeout),
            ("body_min_rate", args.body_min_rate),
            ("keepalive_s", args.keepalive_timeout),
            ("max_connections", args.max_client_connections),
            ("max_connections_per_client", args.max_connections_per_client),
        )
        if value is not None
    }
    return replace(base, **given) if given else base
