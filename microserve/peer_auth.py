"""Engines prove to each other that they hold the internal token before KV moves between them, so that
`remote_send` pushes KV (and the token) only to a peer, never to an arbitrary URL (issue 20, fault 5).

The sender posts a fresh nonce and its own proof, HMAC-SHA256(token, "send" + nonce), to the receiver's
PROOF_PATH; a receiver that holds the token checks it and answers HMAC-SHA256(token, "recv" + nonce).
Neither side ever sends the token itself before the other proved it holds it, and a receiver answers
only a sender that proved itself, so an engine is no signing oracle for strangers.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp
import orjson

PROOF_PATH = "/microserving/peer_proof"
_CONTEXT = b"microserve peer proof v1\n"
_TIMEOUT = aiohttp.ClientTimeout(total=5)


class PeerRefused(Exception):
    """The destination is not a peer this engine can authenticate; it got nothing but the challenge."""


def proof(token: str, role: str, nonce: str) -> str:
    """`role` is "send" or "recv": a proof for one role never passes for the other."""
    message = _CONTEXT + role.encode() + b"\n" + nonce.encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def proof_matches(token: str, role: str, nonce: str, given: object) -> bool:
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(proof(token, role, nonce).encode(), given.encode())


def answer_challenge(token: str, body: object) -> dict[str, str]:
    """The receiver's side: the answer to a sender's challenge; ValueError if the sender did not prove
    that it holds the token."""
    if not isinstance(body, dict) or not isinstance(body.get("nonce"), str) or not body["nonce"]:
        raise ValueError("a peer challenge is a JSON object with a nonce and a proof")
    nonce = body["nonce"]
    if len(nonce) > 128 or not proof_matches(token, "send", nonce, body.get("proof")):
        raise ValueError("the challenge's proof is wrong: the sender does not hold this engine's token")
    return {"proof": proof(token, "recv", nonce)}


def peer_base_url(url: str) -> str:
    """A peer's base URL, `http(s)://host:port`, with no path, query, fragment or credentials."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PeerRefused(f"dst_url must look like http://host:port, got {url!r}")
    if parts.path.strip("/") or parts.query or parts.fragment or parts.username or parts.password:
        raise PeerRefused("dst_url is a peer engine's base URL: no path, query, fragment or credentials")
    return f"{parts.scheme}://{parts.netloc}"


class PeerVerifier:
    """Checks that a destination holds the internal token; a proven peer is trusted for `ttl_s`."""

    def __init__(
        self,
        token: str | None,
        session: aiohttp.ClientSession,
        ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._token = token
        self._session = session
        self._ttl_s = ttl_s
        self._clock = clock
        self._proven: dict[str, float] = {}  # base URL -> when its proof expires

    async def verify(self, url: str) -> str:
        """The peer's base URL once it proved itself; raises PeerRefused otherwise."""
        if not self._token:
            raise PeerRefused(
                "remote_send needs an internal token (--internal-token-file or MICROSERVE_INTERNAL_TOKEN) "
                "to authenticate the receiving engine"
            )
        base = peer_base_url(url)
        now = self._clock()
        if self._proven.get(base, 0.0) > now:
            return base
        nonce = secrets.token_hex(16)
        challenge = {"nonce": nonce, "proof": proof(self._token, "send", nonce)}
        try:
            async with self._session.post(
                base + PROOF_PATH,
                data=orjson.dumps(challenge),
                headers={"Content-Type": "application/json"},
                timeout=_TIMEOUT,
                allow_redirects=False,  # a redirect would send the transfer somewhere unproven
            ) as r:
                answer = await r.read() if r.status == 200 else b""
        except (aiohttp.ClientError, TimeoutError):
            raise PeerRefused("the receiving engine did not answer the peer challenge") from None
        try:
            given = orjson.loads(answer).get("proof") if answer else None
        except (orjson.JSONDecodeError, AttributeError):
            given = None
        if not proof_matches(self._token, "recv", nonce, given):
            raise PeerRefused("the destination is not an engine holding this engine's internal token")
        if len(self._proven) >= 1024:  # peers come and go; forget the expired ones
            self._proven = {u: t for u, t in self._proven.items() if t > now}
        self._proven[base] = now + self._ttl_s
        return base
