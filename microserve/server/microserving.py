"""The engine's microserving routes: fine-grained KV verbs the router composes into strategies.

prep_recv reserves blocks, remote_send computes KV and pushes it engine to engine (never through the
router), start_generate decodes on top of received KV, release frees a reservation. KV arrives at the
internal route /microserving/kv/{request_id}. All of them require the internal token when one is set;
remote_send pushes only to a peer that proved it holds that token (`microserve.peer_auth`), and
prep_recv charges its blocks to the caller's address, up to its share of the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import unquote

import aiohttp
from pydantic import Field

from microserve.api.errors import APIError, bad_request
from microserve.api.prompt import check_prompt_chars, max_token_chars
from microserve.api.protocol import CompletionRequest, RequestModel, parse_request
from microserve.engine.async_engine import AsyncEngine
from microserve.engine.errors import EngineDead, EngineOverloaded
from microserve.engine.kv_send import KVSender, PrefillEnded, send_id
from microserve.engine.kv_storage import KVLayout, KVPayloadError
from microserve.engine.outputs import KVPiece
from microserve.engine.reservations import ReservationError, ReservationQuotaExceeded
from microserve.http.server import Request, Response, Stream
from microserve.peer_auth import PROOF_PATH, PeerRefused, PeerVerifier, answer_challenge
from microserve.server import errors
from microserve.server.app import EngineApp
from microserve.server.handlers import prepare_completion, serve
from microserve.server.prompt_limits import kv_body_limit
from microserve.server.tracing import EngineSpan, SendSpan

log = logging.getLogger(__name__)

KV_ROUTE = "/microserving/kv/"  # + the receiving request id
OFFLOAD_PROMPT_CHARS = 16 * 1024

# No total limit: a transfer takes as long as the prefill behind it; a stalled socket still fails.
TRANSFER_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=120)

Verb = Callable[["Microserving", Request], Awaitable[Response | Stream]]


@dataclass
class Microserving:
    """What the verbs share: the engine, the app (its state and metrics), the internal token, and the
    client session that pushes KV to other engines with the verifier of those peers (both open while
    the server runs)."""

    engine: AsyncEngine
    app: EngineApp
    token: str = ""
    session: aiohttp.ClientSession | None = field(default=None, repr=False)
    peers: PeerVerifier | None = field(default=None, repr=False)

    def span(self, request: Request, name: str) -> EngineSpan | contextlib.nullcontext[None]:
        """The verb's server span when tracing is on (its attributes set by the handler)."""
        tracing = self.app.state.tracing
        return contextlib.nullcontext() if tracing is None else EngineSpan(tracing, request.headers, name)


class PrepRecvRequest(RequestModel):
    request_id: str = Field(min_length=1)
    prompt: str | list[int]
    end: int | None = None


class RemoteSendRequest(RequestModel):
    request_id: str = Field(min_length=1)
    prompt: str | list[int]
    begin: int = 0
    end: int | None = None
    kv_addr_info: dict[str, Any]
    dst_url: str = Field(min_length=1)


class ReleaseRequest(RequestModel):
    request_id: str = Field(min_length=1)


class PrefixesRequest(RequestModel):
    max_tokens: int = Field(default=8192, ge=1)
    limit: int = Field(default=32, ge=1, le=1024)


class StartGenerateRequest(CompletionRequest):
    request_id: str = Field(min_length=1)
    begin: int = 0


def normalize_index(index: int | None, length: int, default: int) -> int:
    """Python slice semantics: negative counts from the end; clamped to [0, length]."""
    if index is None:
        return default
    if index < 0:
        index += length
    return min(max(index, 0), length)


def add_microserving_routes(
    app: EngineApp, engine: AsyncEngine, internal_token: str | None, peer_tls: ssl.SSLContext | None = None
) -> None:
    """`peer_tls`: the client context KV pushes to peers use (an engine under mutual TLS presents its
    certificate to them)."""
    ms = Microserving(engine, app, internal_token or "")
    body = app.max_body_bytes
    for path, verb in (
        ("/microserving/prep_recv", prep_recv),
        ("/microserving/remote_send", remote_send),
        ("/microserving/start_generate", start_generate),
        ("/microserving/release", release),
        ("/microserving/prefixes", prefixes),
    ):
        app.routes.add("POST", path, _guarded(ms, verb), max_body=body)
    # The largest KV transfer is a whole context's K and V.
    kv_body = kv_body_limit(engine.kv_layout.bytes_per_token, engine.max_model_len)
    app.routes.add("POST", KV_ROUTE + "*", _guarded(ms, receive_kv), max_body=kv_body)
    # The peer challenge proves the token by HMAC instead: a sender must not hand its token to a
    # destination before that destination proved it is a peer.
    app.routes.add("POST", PROOF_PATH, functools.partial(peer_proof, ms))

    async def open_session() -> None:
        connector = aiohttp.TCPConnector(ssl=peer_tls) if peer_tls is not None else None
        ms.session = aiohttp.ClientSession(timeout=TRANSFER_TIMEOUT, connector=connector)
        ms.peers = PeerVerifier(ms.token or None, ms.session)

    async def close_session() -> None:
        if ms.session is not None:
            await ms.session.close()

    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)


def _guarded(ms: Microserving, verb: Verb) -> Callable[[Request], Awaitable[Response | Stream]]:
    """`verb` behind the internal token, when one is set."""

    @functools.wraps(verb)
    async def handler(request: Request) -> Response | Stream:
        if ms.token:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), ms.token.encode()):
                raise APIError(401, "The microserving routes need the internal token.", code="unauthorized")
        return await verb(ms, request)

    return handler


async def _prompt_ids(engine: AsyncEngine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        check_prompt_chars(prompt, engine.max_model_len, max_token_chars(engine.tokenizer), "prompt")
        encode = functools.partial(engine.tokenizer.encode, prompt)
        # A long prompt is tokenized on a thread (the tokenizer lets go of the GIL for it).
        ids = await asyncio.to_thread(encode) if len(prompt) > OFFLOAD_PROMPT_CHARS else encode()
    else:
        ids = list(prompt)
    if not ids:
        raise bad_request("prompt must not be empty.", param="prompt")
    vocab = engine.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise bad_request(f"prompt token ids must be in [0, {vocab}).", param="prompt")
    return ids


async def _engine_call(coro: Any) -> Any:
    """Await an engine verb, turning its failures into HTTP errors that say which side failed."""
    try:
        return await coro
    except ReservationError as exc:
        raise APIError(404, str(exc), param="request_id", code="reservation_not_found") from None
    except ReservationQuotaExceeded as exc:
        raise APIError(429, str(exc), code="reservation_limit", headers={"Retry-After": "1"}) from None
    except KVPayloadError as exc:
        raise bad_request(str(exc), code="bad_kv_payload") from None
    except EngineOverloaded as exc:
        raise errors.overloaded(str(exc)) from None
    except EngineDead as exc:
        raise errors.engine_dead(str(exc)) from None
    except ValueError as exc:
        raise bad_request(str(exc)) from None


async def prep_recv(ms: Microserving, request: Request) -> Response:
    with ms.span(request, "engine.prep_recv") as span:
        return await _prep_recv(ms, request, span)


async def _prep_recv(ms: Microserving, request: Request, span: EngineSpan | None) -> Response:
    engine = ms.engine
    req = parse_request(PrepRecvRequest, request.json())
    ids = await _prompt_ids(engine, req.prompt)
    end = normalize_index(req.end, len(ids), len(ids))
    matched = await _engine_call(engine.prep_recv(req.request_id, ids, end, request.remote))
    if span is not None:
        span.set(
            microserve__request_id=req.request_id, microserve__end=end, microserve__matched_tokens=matched
        )
    info = {"request_id": req.request_id, "begin": matched, "end": end, "layout": asdict(engine.kv_layout)}
    return Response.json({"kv_addr_info": info, "matched_len": matched})


async def remote_send(ms: Microserving, request: Request) -> Response:
    tracing = ms.app.state.tracing
    if tracing is None:
        return await _remote_send(ms, request, None)
    with SendSpan(tracing, request.headers, "engine.remote_send") as span:
        return await _remote_send(ms, request, span)


async def _remote_send(ms: Microserving, request: Request, span: SendSpan | None) -> Response:
    engine = ms.engine
    req = parse_request(RemoteSendRequest, request.json())
    ids = await _prompt_ids(engine, req.prompt)
    begin = normalize_index(req.begin, len(ids), 0)
    end = normalize_index(req.end, len(ids), len(ids))
    _check_compatible(engine.kv_layout, req.kv_addr_info)
    assert ms.session is not None and ms.peers is not None, "the server has not started"
    try:
        dst = await ms.peers.verify(req.dst_url)
    except PeerRefused as exc:
        raise APIError(403, str(exc), param="dst_url", code="peer_not_authenticated") from None
    if begin >= end:
        return Response.json({"sent_tokens": 0, "bytes": 0})
    url = f"{dst}{KV_ROUTE}{req.kv_addr_info.get('request_id', req.request_id)}"
    headers = {"Authorization": f"Bearer {ms.token}"} if ms.token else {}
    session = ms.session

    async def push(piece: KVPiece) -> None:
        if span is None:
            await _push(session, url, piece.data, headers)
        else:
            with span.push(piece, url) as pushed:
                await _push(session, url, piece.data, {**headers, **pushed.headers})

    # transfer_time: the sim backend's model (0 on a real engine).
    sender = KVSender(push, engine.transfer_time, on_progress=None if span is None else span.exported)
    try:
        result = await _engine_call(sender.send(engine.prefill(send_id(req.request_id), ids[:end], begin)))
    except PrefillEnded:
        raise errors.internal_error() from None
    sent, size = result.tokens, result.bytes
    if span is not None:
        span.set(
            microserve__request_id=req.request_id,
            microserve__kv__begin=begin,
            microserve__kv__end=end,
            microserve__kv__sent_tokens=sent,
            microserve__kv__bytes=size,
            server__address=req.dst_url,
        )
    return Response.json({"sent_tokens": sent, "bytes": size})


async def _push(session: aiohttp.ClientSession, url: str, data: memoryview, headers: dict[str, str]) -> None:
    try:
        async with session.post(url, data=data, headers=headers, allow_redirects=False) as r:
            if r.status != 200:
                detail = await r.text()
                raise APIError(
                    502,
                    f"the receiver {url} refused the KV ({r.status}): {detail}",
                    code="kv_transfer_refused",
                )
    except aiohttp.ClientError as exc:
        raise APIError(
            502, f"the receiver {url} is unreachable: {exc}", code="kv_receiver_unreachable"
        ) from None


def _check_compatible(mine: KVLayout, kv_addr_info: dict[str, Any]) -> None:
    theirs = kv_addr_info.get("layout")
    if theirs is not None and theirs != asdict(mine):
        raise bad_request(
            f"incompatible KV layout: the receiver has {theirs}, this engine has {asdict(mine)} "
            "(different model, dtype or block size)",
            param="kv_addr_info",
            code="incompatible_kv",
        )


async def peer_proof(ms: Microserving, request: Request) -> Response:
    if not ms.token:
        raise APIError(403, "This engine has no internal token to prove.", code="no_internal_token")
    try:
        return Response.json(answer_challenge(ms.token, request.json()))
    except ValueError as exc:
        raise APIError(401, str(exc), code="unauthorized") from None


async def receive_kv(ms: Microserving, request: Request) -> Response:
    request_id = unquote(request.path.removeprefix(KV_ROUTE))
    with ms.span(request, "engine.kv_import") as span:
        begin, end = await _engine_call(ms.engine.import_kv(request_id, request.body))
        if span is not None:
            span.set(
                microserve__request_id=request_id,
                microserve__kv__begin=begin,
                microserve__kv__end=end,
                microserve__kv__bytes=len(request.body),
            )
        return Response.json({"begin": begin, "end": end})


async def start_generate(ms: Microserving, request: Request) -> Response | Stream:
    state = ms.app.state
    req = parse_request(StartGenerateRequest, request.json())
    if len(req.prompts) != 1:
        raise bad_request("start_generate takes one prompt.", param="prompt")
    # The router asks for the ids (return_token_ids) to count the answer and to continue it if this
    # engine dies.
    prepared = prepare_completion(state, req)
    prepared.request_id = req.request_id
    prepared.begin = normalize_index(req.begin, len(prepared.prompts[0]), 0)
    return await serve(request, state, prepared)


async def release(ms: Microserving, request: Request) -> Response:
    req = parse_request(ReleaseRequest, request.json())
    released = await _engine_call(ms.engine.release(req.request_id))
    return Response.json({"released": released})


async def prefixes(ms: Microserving, request: Request) -> Response:
    """The hottest prefixes this engine's KV cache holds (token ids, whole blocks), hottest first: what
    a leaving engine hands to a survivor (`microserve/router/handoff.py`)."""
    req = parse_request(PrefixesRequest, request.json())
    found = await _engine_call(ms.engine.hot_prefixes(req.max_tokens, req.limit))
    return Response.json({"prefixes": [{"prompt": ids, "tokens": len(ids)} for ids in found]})
