"""Bearer tokens: read from a flag, a file or the environment (a file or the environment keep them out of
`ps`), generated for the engines of `microserve serve`, and checked in constant time."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

INTERNAL_TOKEN_ENV = "MICROSERVE_INTERNAL_TOKEN"
ADMIN_TOKEN_ENV = "MICROSERVE_ADMIN_TOKEN"
METRICS_TOKEN_ENV = "MICROSERVE_METRICS_TOKEN"


def generate_token() -> str:
    """256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def read_token_file(path: str | Path) -> str:
    """The token in a file (surrounding whitespace dropped); a clear error if missing or empty."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the token file {str(path)!r}: {exc.strerror or exc}") from None
    if not token:
        raise ValueError(f"the token file {str(path)!r} is empty")
    return token


def resolve_token(name: str, value: str | None, file: str | None, env: str) -> str | None:
    """A token from `--NAME` (shows in `ps`: warned about), else `--NAME-file`, else `$env`, else None."""
    if value is not None and file is not None:
        raise ValueError(f"give --{name} or --{name}-file, not both")
    if value is not None:
        if not value:
            raise ValueError(f"--{name} is empty")
        log.warning("--%s shows in the process list; prefer --%s-file or $%s", name, name, env)
        return value
    if file is not None:
        return read_token_file(file)
    return os.environ.get(env) or None


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an `Authorization` header carries `Bearer <token>` (constant time in the token)."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to any interface


def require_internal_token(host: str, token: str | None) -> None:
    """An engine reachable beyond loopback must not expose its KV verbs to anyone: refuse to start."""
    if not token and not is_loopback(host):
        raise ValueError(
            f"--host {host} is reachable beyond loopback, and the microserving routes would be open to "
            f"anyone: give an internal token (--internal-token-file PATH or ${INTERNAL_TOKEN_ENV})"
        )
