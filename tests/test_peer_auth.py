"""Peer authentication before a KV transfer: the HMAC challenge both ways, destination URLs, and a
verifier that sends nothing but the challenge to a destination that cannot prove it holds the token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from microserve.peer_auth import (
    PROOF_PATH,
    PeerRefused,
    PeerVerifier,
    answer_challenge,
    peer_base_url,
    proof,
    proof_matches,
)
from microserve.processes import free_port

TOKEN = "peer-token"


def test_a_proof_is_bound_to_its_role_nonce_and_token() -> None:
    p = proof(TOKEN, "recv", "n1")
    assert proof_matches(TOKEN, "recv", "n1", p)
    assert not proof_matches(TOKEN, "send", "n1", p)  # a sender's proof never passes as a receiver's
    assert not proof_matches(TOKEN, "recv", "n2", p)
    assert not proof_matches("other", "recv", "n1", p)
    assert not proof_matches(TOKEN, "recv", "n1", None)


def test_a_receiver_answers_only_a_sender_that_proved_itself() -> None:
    answer = answer_challenge(TOKEN, {"nonce": "abc", "proof": proof(TOKEN, "send", "abc")})
    assert proof_matches(TOKEN, "recv", "abc", answer["proof"])
    for bad in (
        {"nonce": "abc"},
        {"nonce": "abc", "proof": proof("other", "send", "abc")},
        {"nonce": "abc", "proof": proof(TOKEN, "recv", "abc")},  # a reflected answer is no sender's proof
        {"nonce": "", "proof": "x"},
        ["abc"],
    ):
        with pytest.raises(ValueError):
            answer_challenge(TOKEN, bad)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://10.0.0.1:21",
        "http://",
        "http://10.0.0.1:9000/admin",
        "http://10.0.0.1:9000/?x=1",
        "http://10.0.0.1:9000#frag",
        "http://user:pw@10.0.0.1:9000",
        "file:///etc/passwd",
    ],
)
def test_a_destination_is_a_base_url_and_nothing_more(url: str) -> None:
    with pytest.raises(PeerRefused):
        peer_base_url(url)


def test_a_base_url_keeps_scheme_host_and_port() -> None:
    assert peer_base_url("http://127.0.0.1:8001/") == "http://127.0.0.1:8001"
    assert peer_base_url(" https://engine-2:443 ") == "https://engine-2:443"


class Recorder:
    """A loopback HTTP server that records every request and answers with `answer(request, body)`."""

    def __init__(self, answer: Callable[[web.Request, bytes], web.Response]) -> None:
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.answer = answer

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append((request.method, request.path, dict(request.headers), body))
        return self.answer(request, body)


@asynccontextmanager
async def recorder(
    answer: Callable[[web.Request, bytes], web.Response],
) -> AsyncIterator[tuple[str, Recorder]]:
    rec = Recorder(answer)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), rec
    finally:
        await server.close()


def _peer(token: str) -> Callable[[web.Request, bytes], web.Response]:
    def answer(request: web.Request, body: bytes) -> web.Response:
        try:
            return web.json_response(answer_challenge(token, orjson.loads(body)))
        except ValueError:
            return web.json_response({"error": "no"}, status=401)

    return answer


def _ok(request: web.Request, body: bytes) -> web.Response:
    return web.json_response({"proof": "0" * 64})


async def _verify(token: str | None, url: str, **kw: Any) -> str:
    async with aiohttp.ClientSession() as session:
        return await PeerVerifier(token, session, **kw).verify(url)


async def test_a_peer_with_the_token_is_verified_once_and_trusted_for_a_while() -> None:
    async with recorder(_peer(TOKEN)) as (url, rec), aiohttp.ClientSession() as session:
        now = [0.0]
        verifier = PeerVerifier(TOKEN, session, ttl_s=30.0, clock=lambda: now[0])
        assert await verifier.verify(url + "/") == url
        assert await verifier.verify(url) == url
        assert len(rec.seen) == 1  # proven: no second challenge within the TTL
        now[0] = 31.0
        await verifier.verify(url)
        assert len(rec.seen) == 2


async def test_an_arbitrary_server_gets_only_the_challenge_never_the_token() -> None:
    async with recorder(_ok) as (url, rec):
        with pytest.raises(PeerRefused, match="not an engine holding"):
            await _verify(TOKEN, url)
    [(method, path, headers, body)] = rec.seen
    assert (method, path) == ("POST", PROOF_PATH)
    assert "Authorization" not in headers and TOKEN.encode() not in body


async def test_an_engine_with_another_token_is_refused() -> None:
    async with recorder(_peer("another-token")) as (url, _):
        with pytest.raises(PeerRefused):
            await _verify(TOKEN, url)


async def test_without_a_token_nothing_is_sent_anywhere() -> None:
    async with recorder(_peer(TOKEN)) as (url, rec):
        with pytest.raises(PeerRefused, match="needs an internal token"):
            await _verify(None, url)
    assert rec.seen == []


async def test_a_redirect_is_not_followed() -> None:
    async with recorder(_peer(TOKEN)) as (peer_url, peer):

        def redirect(request: web.Request, body: bytes) -> web.Response:
            return web.Response(status=307, headers={"Location": peer_url + PROOF_PATH})

        async with recorder(redirect) as (url, _):
            with pytest.raises(PeerRefused):
                await _verify(TOKEN, url)
    assert peer.seen == []


async def test_nobody_listening_is_refused() -> None:
    with pytest.raises(PeerRefused, match="did not answer"):
        await _verify(TOKEN, f"http://127.0.0.1:{free_port()}")
