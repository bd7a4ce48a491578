"""The admin API's keys: `POST /admin/keys` makes one (its secret shown in that answer only), `GET` lists
them, `PATCH /admin/keys/{id}` changes one, `DELETE /admin/keys/{id}` revokes it (at once on every replica
that shares the store). Under the admin token; answers 403 when the router runs without `--api-keys`."""

from __future__ import annotations

import functools
from typing import Any

from microserve.api.errors import APIError, bad_request
from microserve.http.server import Request, Response, Routes
from microserve.router.admin import AdminHandler, _authorized
from microserve.router.router import Router
from microserve.tenants.gateway import Gateway
from microserve.tenants.keys import KeyRecord

KEYS = "/admin/keys"


def add_key_routes(routes: Routes, router: Router) -> None:
    """The key routes under the admin token; a shared store that is down answers 503."""
    for method, path, handler in (
        ("GET", KEYS, list_keys),
        ("POST", KEYS, create_key),
        ("GET", KEYS + "/*", get_key),
        ("PATCH", KEYS + "/*", patch_key),
        ("DELETE", KEYS + "/*", delete_key),
    ):
        routes.add(method, path, functools.partial(_authorized, _store_errors(handler), router))


def _store_errors(handler: AdminHandler) -> AdminHandler:
    @functools.wraps(handler)
    async def wrapped(router: Router, request: Request) -> Response:
        try:
            return await handler(router, request)
        except OSError as exc:  # StoreUnavailable, or a keys file that cannot be written
            raise APIError(503, f"Keys cannot be changed now: {exc}", code="store_unavailable",
                           headers={"Retry-After": "5"}) from None  # fmt: skip

    return wrapped


def _gateway(router: Router) -> Gateway:
    if router.tenants is None:
        raise APIError(
            403, "API keys are off: start the router with --api-keys PATH|redis://…", code="keys_off"
        )
    return router.tenants


def _object(request: Request) -> dict[str, Any]:
    body = request.json()
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _key_id(request: Request) -> str:
    key_id = request.path[len(KEYS) + 1 :]
    if not key_id or "/" in key_id:
        raise APIError(404, f"Not Found: {request.method} {request.path}")
    return key_id


async def _record(gateway: Gateway, key_id: str) -> KeyRecord:
    record = await gateway.store.key_by_id(key_id)
    if record is None:
        raise APIError(404, f"There is no key {key_id!r}.", param="id", code="key_not_found")
    return record


async def list_keys(router: Router, request: Request) -> Response:
    records = await _gateway(router).store.keys()
    records.sort(key=lambda r: r.created)
    return Response.json({"object": "list", "data": [r.public() for r in records]})


async def create_key(router: Router, request: Request) -> Response:
    gateway = _gateway(router)
    try:
        record, secret = KeyRecord.create(_object(request))
    except (TypeError, ValueError) as exc:
        raise bad_request(f"Invalid key: {exc}") from None
    await gateway.store.put_key(record)
    return Response.json({**record.public(), "key": secret}, status=201)


async def get_key(router: Router, request: Request) -> Response:
    gateway = _gateway(router)
    return Response.json((await _record(gateway, _key_id(request))).public())


async def patch_key(router: Router, request: Request) -> Response:
    gateway = _gateway(router)
    record = await _record(gateway, _key_id(request))
    try:
        record = record.patched(_object(request))
    except (TypeError, ValueError) as exc:
        raise bad_request(f"Invalid change: {exc}") from None
    await gateway.store.put_key(record)
    return Response.json(record.public())


async def delete_key(router: Router, request: Request) -> Response:
    gateway = _gateway(router)
    key_id = _key_id(request)
    if not await gateway.store.delete_key(key_id):
        raise APIError(404, f"There is no key {key_id!r}.", param="id", code="key_not_found")
    return Response.json({"id": key_id, "object": "key", "deleted": True})
