"""TLS for microserve's HTTP server: a server context from a certificate chain and its key (PEM files),
TLS 1.2 or later, optionally requiring clients to present a certificate signed by a given CA (mutual TLS)."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> ssl.SSLContext:
    """Raises OSError (ssl.SSLError is one) naming the file when a certificate or key cannot be loaded."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise OSError(f"cannot load the TLS certificate {cert} with key {key}: {exc}") from None
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(str(client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f"cannot load the client CA {client_ca}: {exc}") from None
    return context
