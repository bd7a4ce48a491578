"""Base URLs of HTTP services (workers, engines): checked and written one way wherever they come from."""

from __future__ import annotations

from urllib.parse import urlsplit


def base_url(text: str) -> str:
    """`http(s)://host:port` without a trailing slash; a ValueError says what is wrong with anything else."""
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"a worker URL must look like http://host:port, got {text!r}")
    if parts.path or parts.query:
        raise ValueError(f"a worker URL is a base URL without a path, got {text!r}")
    return url
