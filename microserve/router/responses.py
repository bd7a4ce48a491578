"""The router's `/v1/responses`: a Responses request runs as a chat completion through the router's own
dispatch (admission, tenants, strategies, retries, continuation), and its answer is reshaped; the router
keeps the conversations it answered (bounded, per tenant) so `previous_response_id` continues one.
"""

from __future__ import annotations

import functools
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

PATH = "/v1/responses"
PER_TENANT = 4096  # responses kept for each tenant, the least recently used dropped first
TENANTS = 4096  # tenants whose responses are kept, likewise


@dataclass(slots=True)
class Stored:
    body: dict[str, Any]  # the `response` object, as GET answers it
    conversation: list[dict[str, Any]]  # its chat messages: history, input, answer (no instructions)


class ResponseStore:
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
        previous = store.get(tenant, req.previous_response_id)
        if previous is None:
            raise not_found(req.previous_response_id, "previous_response_id")
        history = previous.conversation
    builder = ResponseBuilder(req)
    events = ResponseEvents(builder)
    view = _ChatView(request, orjson.dumps(chat_body(req, history)), events)
    answer = await dispatch.handle(router, view, Route.CHAT)
    if isinstance(answer, Response):
        body = builder.take_chat(orjson.loads(answer.body))
        _keep(store, tenant, req, history, builder)
        return Response.json(body, headers=answer.headers)
    assert view.opened is not None
    await view.opened.write(events.closing())  # a stream cut short gets its closing events too
    if events.builder.finish_reason is not None:
        _keep(store, tenant, req, history, builder)
    return view.opened


def _keep(
    store: ResponseStore,
    tenant: str,
    req: ResponsesRequest,
    history: list[dict[str, Any]],
    b: ResponseBuilder,
) -> None:
    if req.store:
        store.put(tenant, b.id, Stored(b.body(), history + input_messages(req.input) + [b.chat_message()]))


async def retrieve(router: Router, store: ResponseStore, request: Request) -> Response:
    tenant = await _tenant(router, request)
    response_id = unquote(request.path.removeprefix(PATH + "/"))
    stored = store.get(tenant, response_id)
    if stored is None:
        raise not_found(response_id)
    return Response.json(stored.body)


async def delete(router: Router, store: ResponseStore, request: Request) -> Response:
    tenant = await _tenant(router, request)
    response_id = unquote(request.path.removeprefix(PATH + "/"))
    if not store.delete(tenant, response_id):
        raise not_found(response_id)
    return Response.json({"id": response_id, "object": "response", "deleted": True})


def add_responses_routes(table: Routes, router: Router, store: ResponseStore | None = None) -> None:
    store = store or ResponseStore()
    table.add("POST", PATH, functools.partial(create, router, store), max_body=router.config.max_body_bytes)
    table.add_prefix("GET", PATH + "/", functools.partial(retrieve, router, store))
    table.add_prefix("DELETE", PATH + "/", functools.partial(delete, router, store))
