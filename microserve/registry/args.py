"""`microserve engine`'s self-registration flags: where to register, the URL to advertise, the lease's TTL,
and the role and labels routers read from the record."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass

from microserve.http.urls import base_url
from microserve.registry.etcd import EtcdTarget


@dataclass(slots=True, frozen=True)
class RegisterOptions:
    """What the engine publishes besides what it learns once built (models, capacity)."""

    target: EtcdTarget
    url: str
    ttl_s: int
    role: str
    labels: dict[str, str]


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--register",
        default=None,
        metavar="etcd://HOST:PORT[/prefix]",
        help="publish this engine in etcd under a lease while it runs (routers follow with --discovery)",
    )
    p.add_argument(
        "--advertise-url",
        default=None,
        help="the URL routers reach this engine at (default: http://HOST:PORT from --host/--port)",
    )
    p.add_argument("--register-ttl", type=int, default=10, help="seconds the registration outlives a crash")
    p.add_argument("--role", default="both", choices=["prefill", "decode", "both"], help="as published")
    p.add_argument(
        "--label",
        action="append",
        type=_label,
        default=[],
        metavar="KEY=VALUE",
        help="published (repeatable)",
    )


def advertised_url(host: str, port: int) -> str:
    """http://host:port; a wildcard address advertises this machine's name instead (reachable from others)."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"http://{host}:{port}"


def registration_from_args(args: argparse.Namespace) -> RegisterOptions | None:
    if args.register is None:
        return None
    if args.register_ttl < 2:
        raise ValueError(f"--register-ttl must be at least 2 seconds, got {args.register_ttl}")
    url = args.advertise_url or advertised_url(args.host, args.port)
    try:
        url = base_url(url)  # checked now, not once the model has loaded
    except ValueError as exc:
        raise ValueError(f"--advertise-url: {exc}") from None
    return RegisterOptions(
        target=EtcdTarget.parse(args.register),
        url=url,
        ttl_s=args.register_ttl,
        role=args.role,
        labels=dict(args.label),
    )
