"""The router's `/v1/responses`: a Responses request runs as a chat completion through the router's own
dispatch (admission, tenants, strategies, retries, continuation), and its answer is reshaped; the router
keeps the conversations it answered (bounded, per tenant) so `previous_response_id` continues one.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from microserve.api.errors import APIError
from microserve.api.responses import (
    ResponseBuilder,
    ResponseEvents,
    ResponsesRequest,
    chat_body,
    input_messages,
    parse_responses_request,
)
from microserve.http.server import Request, Response, Routes, Stream
from microserve.router import dispatch
from microserve.router.request import Route
from microserve.router.router import Router

log = logging.getLogger(__name__)


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a failed call to the shared store raises; redis is imported only by a router that has one
    (importing it loads the OpenTelemetry API, which an untraced router must not)."""
    from microserve.router.redis_state import STORE_ERRORS

    return STORE_ERRORS


PATH = "/v1/responses"
PER_TENANT = 4096  # responses kept for each tenant, the least recently used dropped first
TENANTS = 4096  # tenants whose responses are kept in this process, likewise
TTL_S = 7 * 24 * 3600  # in the shared store: a week after its answer
KEY_PREFIX = "microserve:responses:"


@dataclass(slots=True)
class Stored:
    body: dict[str, Any]  # the `response` object, as GET answers it
    conversation: list[dict[str, Any]]  # its chat messages: history, input, answer (no instructions)


class LocalResponses:
    """In-process, bounded, least recently used first out; a tenant sees only its own responses."""

    def __init__(self, per_tenant: int = PER_TENANT, tenants: int = TENANTS) -> None:
        self.per_tenant = per_tenant
        self.tenants = tenants
        self._by_tenant: OrderedDict[str, OrderedDict[str, Stored]] = OrderedDict()

    def get(self, tenant: str, response_id: str) -> Stored | None:
        kept = self._by_tenant.get(tenant)
        stored = kept.get(response_id) if kept is not None else None
        if stored is not None and kept is not None:
            kept.move_to_end(response_id)
            self._by_tenant.move_to_end(tenant)
        return stored

    def put(self, tenant: str, response_id: str, stored: Stored) -> None:
        kept = self._by_tenant.setdefault(tenant, OrderedDict())
        self._by_tenant.move_to_end(tenant)
        kept[response_id] = stored
        while len(kept) > self.per_tenant:
            kept.popitem(last=False)
        while len(self._by_tenant) > self.tenants:
            self._by_tenant.popitem(last=False)

    def delete(self, tenant: str, response_id: str) -> bool:
        kept = self._by_tenant.get(tenant)
        return kept is not None and kept.pop(response_id, None) is not None


class ResponseStore:
    """The responses a router answered: in this process, and in the router replicas' shared Redis
    (`--shared-state`) when there is one, so that any replica continues a conversation. Redis keeps
    each tenant's newest PER_TENANT (a sorted set by time beside the JSON values, which expire after
    TTL_S). A Redis that does not answer costs no request: this replica's own responses still work."""

    def __init__(
        self, redis: Any = None, local: LocalResponses | None = None, prefix: str = KEY_PREFIX
    ) -> None:
        self.local = local or LocalResponses()
        self.redis = redis  # a redis.asyncio client (decode_responses=True), or None
        self.prefix = prefix

    def _keys(self, tenant: str, response_id: str) -> tuple[str, str]:
        return f"{self.prefix}{tenant}:{response_id}", f"{self.prefix}{tenant}:recent"

    async def get(self, tenant: str, response_id: str) -> Stored | None:
        """Redis is the truth while it answers (another replica may have deleted it); this process's
        copy is the fallback when it does not."""
        if self.redis is None:
            return self.local.get(tenant, response_id)
        try:
            raw = await self.redis.get(self._keys(tenant, response_id)[0])
        except _store_errors() as exc:
            log.warning("responses: the shared store did not answer (%s); reading this router's copy", exc)
            return self.local.get(tenant, response_id)
        if raw is None:
            return None
        value = orjson.loads(raw)
        return Stored(value["body"], value["conversation"])

    async def put(self, tenant: str, response_id: str, stored: Stored) -> None:
        self.local.put(tenant, response_id, stored)
        if self.redis is None:
            return
        key, recent = self._keys(tenant, response_id)
        value = orjson.dumps({"body": stored.body, "conversation": stored.conversation})
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(key, value, ex=TTL_S)
                pipe.zadd(recent, {response_id: time.time()})
                pipe.zrange(recent, 0, -PER_TENANT - 1)  # the oldest beyond the bound
                pipe.zremrangebyrank(recent, 0, -PER_TENANT - 1)
                pipe.expire(recent, TTL_S)
                results = await pipe.execute()
            dropped = results[2]
            if dropped:
                await self.redis.delete(*(self._keys(tenant, r)[0] for r in dropped))
        except _store_errors() as exc:
            log.warning(
                "responses: the shared store did not answer (%s); %s kept here only", exc, response_id
            )

    async def delete(self, tenant: str, response_id: str) -> bool:
        deleted = self.local.delete(tenant, response_id)
        if self.redis is None:
            return deleted
        key, recent = self._keys(tenant, response_id)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(key)
                pipe.zrem(recent, response_id)
                removed, _ = await pipe.execute()
        except _store_errors() as exc:
            log.warning("responses: the shared store did not answer (%s) deleting %s", exc, response_id)
            return deleted
        return deleted or bool(removed)


def not_found(response_id: str, param: str | None = None) -> APIError:
    what = "Previous response" if param == "previous_response_id" else "Response"
    code = "previous_response_not_found" if param else "response_not_found"
    return APIError(404, f"{what} with id '{response_id}' not found.", param=param, code=code)


class _EventStream(Stream):
    """What dispatch writes chat SSE to: each write goes out as Responses events on the client's stream."""

    __slots__ = ("_inner", "events")

    def __init__(self, inner: Stream, events: ResponseEvents) -> None:
        Stream.__init__(self, inner._conn, chunked=False)
        self._inner = inner
        self.events = events

    async def write(self, data: bytes) -> None:
        if self.tap is not None:  # metering and the response cache see the chat stream
            self.tap(data)
        await self._inner.write(self.events.feed(data))


class _ChatView(Request):
    """The client's request as the chat request dispatch runs; its stream speaks Responses events."""

    __slots__ = ("events", "opened")

    def __init__(self, request: Request, body: bytes, events: ResponseEvents) -> None:
        Request.__init__(self, request._conn, "POST", Route.CHAT.value, "", request.headers, body)
        self.events = events
        self.opened: Stream | None = None

    async def stream(self, status: int = 200, headers: Mapping[str, str] | None = None) -> Stream:
        self.opened = await Request.stream(self, status, headers)
        return _EventStream(self.opened, self.events)


async def _tenant(router: Router, request: Request) -> str:
    if router.tenants is None:
        return ""
    return (await router.tenants.authenticate(request.headers)).tenant


async def create(router: Router, store: ResponseStore, request: Request) -> Response | Stream:
    tenant = await _tenant(router, request)
    req = parse_responses_request(request.json())
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        previous = await store.get(tenant, req.previous_response_id)
        if previous is None:
            raise not_found(req.previous_response_id, "previous_response_id")
        history = previous.conversation
    builder = ResponseBuilder(req)
    events = ResponseEvents(builder)
    view = _ChatView(request, orjson.dumps(chat_body(req, history)), events)
    answer = await dispatch.handle(router, view, Route.CHAT)
    if isinstance(answer, Response):
        body = builder.take_chat(orjson.loads(answer.body))
        await _keep(store, tenant, req, history, builder)
        return Response.json(body, headers=answer.headers)
    assert view.opened is not None
    await view.opened.write(events.closing())  # a stream cut short gets its closing events too
    if events.builder.finish_reason is not None:
        await _keep(store, tenant, req, history, builder)
    return view.opened


async def _keep(
    store: ResponseStore,
    tenant: str,
    req: ResponsesRequest,
    history: list[dict[str, Any]],
    b: ResponseBuilder,
) -> None:
    if req.store:
        await store.put(
            tenant, b.id, Stored(b.body(), history + input_messages(req.input) + [b.chat_message()])
        )


async def retrieve(router: Router, store: ResponseStore, request: Request) -> Response:
    tenant = await _tenant(router, request)
    response_id = unquote(request.path.removeprefix(PATH + "/"))
    stored = await store.get(tenant, response_id)
    if stored is None:
        raise not_found(response_id)
    return Response.json(stored.body)


async def delete(router: Router, store: ResponseStore, request: Request) -> Response:
    tenant = await _tenant(router, request)
    response_id = unquote(request.path.removeprefix(PATH + "/"))
    if not await store.delete(tenant, response_id):
        raise not_found(response_id)
    return Response.json({"id": response_id, "object": "response", "deleted": True})


def add_responses_routes(table: Routes, router: Router, store: ResponseStore | None = None) -> None:
    # with --shared-state, the replicas' Redis keeps them too (any replica continues a conversation)
    store = store or ResponseStore(getattr(router.shared_state, "client", None))
    table.add("POST", PATH, functools.partial(create, router, store), max_body=router.config.max_body_bytes)
    table.add_prefix("GET", PATH + "/", functools.partial(retrieve, router, store))
    table.add_prefix("DELETE", PATH + "/", functools.partial(delete, router, store))
