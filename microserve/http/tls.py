"""TLS for microserve's HTTP server and client: a server context from a certificate chain and its key (PEM
files), TLS 1.2 or later, optionally requiring clients to present a certificate signed by a given CA
(mutual TLS); a client context that trusts a CA and presents a certificate of its own."""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
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


def client_context(
    ca: str | Path | None, cert: str | Path | None = None, key: str | Path | None = None
) -> ssl.SSLContext:
    """A client's context: servers verified against `ca` (the system's CAs when None), and with `cert`
    and `key`, this certificate presented to servers that require one (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        try:
            context.load_verify_locations(str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f"cannot load the CA {ca}: {exc}") from None
    if cert is not None:
        try:
            context.load_cert_chain(str(cert), None if key is None else str(key))
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f"cannot load the client certificate {cert} with key {key}: {exc}") from None
    return context


@dataclass(frozen=True, slots=True)
class EngineTLS:
    """An engine's TLS: it serves HTTPS with `cert`; with `client_ca`, every client must present a
    certificate that CA signed (the router, peer engines). It presents `cert` itself when it pushes KV
    to a peer, and verifies the peer against `client_ca`: one CA for the fleet's insides."""

    cert: str
    key: str
    client_ca: str | None = None

    def server(self) -> ssl.SSLContext:
        return server_context(self.cert, self.key, self.client_ca)

    def client(self) -> ssl.SSLContext:
        return client_context(self.client_ca, self.cert, self.key)


def add_engine_tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="serve HTTPS with this certificate chain")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        default=None,
        metavar="PEM",
        help="require every client (the router, peer engines) to present a certificate this CA signed "
        "(mutual TLS); peers pushed KV to are verified against it too",
    )


def engine_tls(args: argparse.Namespace) -> EngineTLS | None:
    """From the engine's flags; ValueError for a half-given pair."""
    cert, key, ca = args.tls_cert, args.tls_key, args.tls_client_ca
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if cert is None:
        if ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
        return None
    return EngineTLS(cert, key, ca)
