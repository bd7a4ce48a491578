"""The engine's microserving routes: fine-grained KV verbs the router composes into strategies.

prep_recv reserves blocks, remote_send computes KV and pushes it engine to engine (never through the
router), start_generate decodes on top of received KV, release frees a reservation. KV arrives at the
internal route /microserving/kv/{request_id}. All of them require the internal token when one is set;
remote_send pushes only to a peer that proved it holds that token (`microserve.peer_auth`), and
prep_recv charges its blocks to the caller's address, up to its share of the cache.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import aclosing
from dataclasses import asdict
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import Field

from microserve.api.prompt import text_prompt_ids
from microserve.api.protocol import CompletionRequest, RequestModel, parse_request
from microserve.engine.async_engine import AsyncEngine
from microserve.engine.errors import EngineDead, EngineOverloaded
from microserve.engine.kv_storage import KVLayout, KVPayloadError
from microserve.engine.reservations import ReservationError, ReservationQuotaExceeded
from microserve.peer_auth import PROOF_PATH, PeerRefused, PeerVerifier, answer_challenge
from microserve.server import errors
from microserve.server.app import STATE, read_json
from microserve.server.errors import APIError, bad_request, json_response
from microserve.server.handlers import prepare_completion, serve

log = logging.getLogger(__name__)

SESSION = web.AppKey("microserving_session", aiohttp.ClientSession)
ENGINE = web.AppKey("microserving_engine", AsyncEngine)
TOKEN = web.AppKey("internal_token", str)
PEERS = web.AppKey("microserving_peers", PeerVerifier)

# No total limit: a transfer takes as long as the prefill behind it; a stalled socket still fails.
TRANSFER_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=120)


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


def add_microserving_routes(app: web.Application, engine: AsyncEngine, internal_token: str | None) -> None:
    app[ENGINE] = engine
    app[TOKEN] = internal_token or ""
    app.middlewares.append(_require_internal_token)
    app.router.add_post("/microserving/prep_recv", prep_recv)
    app.router.add_post("/microserving/remote_send", remote_send)
    app.router.add_post("/microserving/start_generate", start_generate)
    app.router.add_post("/microserving/release", release)
    app.router.add_post("/microserving/kv/{request_id}", receive_kv)
    app.router.add_post(PROOF_PATH, peer_proof)
    app.cleanup_ctx.append(_client_session)


async def _client_session(app: web.Application):  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession(timeout=TRANSFER_TIMEOUT) as session:
        app[SESSION] = session
        app[PEERS] = PeerVerifier(app[TOKEN] or None, session)
        yield


@web.middleware
async def _require_internal_token(request: web.Request, handler: Any) -> web.StreamResponse:
    token = request.app[TOKEN]
    # The peer challenge proves the token by HMAC instead: a sender must not hand its token to a
    # destination before that destination proved it is a peer.
    if token and request.path.startswith("/microserving/") and request.path != PROOF_PATH:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return errors.error_response(
                APIError(401, "The microserving routes need the internal token.", code="unauthorized")
            )
    return await handler(request)


def _prompt_ids(engine: AsyncEngine, prompt: str | list[int]) -> list[int]:
    ids = text_prompt_ids(engine.tokenizer, prompt)
    if not ids:
        raise bad_request("prompt must not be empty.", param="prompt")
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


async def prep_recv(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    req = parse_request(PrepRecvRequest, (await read_json(request))[0])
    ids = _prompt_ids(engine, req.prompt)
    end = normalize_index(req.end, len(ids), len(ids))
    matched = await _engine_call(engine.prep_recv(req.request_id, ids, end, request.remote or ""))
    info = {"request_id": req.request_id, "begin": matched, "end": end, "layout": asdict(engine.kv_layout)}
    return json_response({"kv_addr_info": info, "matched_len": matched})


async def remote_send(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    req = parse_request(RemoteSendRequest, (await read_json(request))[0])
    ids = _prompt_ids(engine, req.prompt)
    begin = normalize_index(req.begin, len(ids), 0)
    end = normalize_index(req.end, len(ids), len(ids))
    _check_compatible(engine.kv_layout, req.kv_addr_info)
    try:
        dst = await request.app[PEERS].verify(req.dst_url)
    except PeerRefused as exc:
        raise APIError(403, str(exc), param="dst_url", code="peer_not_authenticated") from None
    if begin >= end:
        return json_response({"sent_tokens": 0, "bytes": 0})
    url = f"{dst}/microserving/kv/{req.kv_addr_info.get('request_id', req.request_id)}"
    headers = {"Authorization": f"Bearer {request.app[TOKEN]}"} if request.app[TOKEN] else {}
    sent = size = 0
    # A private id: this engine may also hold the receiving side's reservation under request_id.
    prefill = engine.prefill(f"{req.request_id}/send", ids[:end], begin)
    async with aclosing(prefill):
        try:
            progress = await _engine_call(anext(prefill))
            while True:
                for piece in progress.payloads:
                    await asyncio.sleep(engine.transfer_time(piece.num_tokens))  # the sim backend's model
                    await _push(request.app[SESSION], url, piece.data, headers)
                    sent += piece.num_tokens
                    size += len(piece.data)
                if progress.finished:
                    break
                progress = await _engine_call(anext(prefill))
        except StopAsyncIteration:
            raise errors.internal_error() from None
    return json_response({"sent_tokens": sent, "bytes": size})


async def _push(session: aiohttp.ClientSession, url: str, data: bytes, headers: dict[str, str]) -> None:
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


async def peer_proof(request: web.Request) -> web.Response:
    token = request.app[TOKEN]
    if not token:
        raise APIError(403, "This engine has no internal token to prove.", code="no_internal_token")
    try:
        return json_response(answer_challenge(token, (await read_json(request))[0]))
    except ValueError as exc:
        raise APIError(401, str(exc), code="unauthorized") from None


async def receive_kv(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    payload = await request.read()
    begin, end = await _engine_call(engine.import_kv(request.match_info["request_id"], payload))
    return json_response({"begin": begin, "end": end})


async def start_generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    req = parse_request(StartGenerateRequest, (await read_json(request))[0])
    if len(req.prompts) != 1:
        raise bad_request("start_generate takes one prompt.", param="prompt")
    # The router asks for the ids (return_token_ids) to count the answer and to continue it if this
    # engine dies.
    prepared = prepare_completion(state, req)
    prepared.request_id = req.request_id
    prepared.begin = normalize_index(req.begin, len(prepared.prompts[0]), 0)
    return await serve(request, state, prepared)


async def release(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    req = parse_request(ReleaseRequest, (await read_json(request))[0])
    released = await _engine_call(engine.release(req.request_id))
    return json_response({"released": released})
