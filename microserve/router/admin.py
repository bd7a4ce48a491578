"""The admin API under its own bearer token: list, add, remove and drain workers; read and set the strategy
and the policy. Answers in JSON; errors in OpenAI's shape (401 for a missing or wrong token)."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from microserve.api.errors import APIError, bad_request
from microserve.http.server import Request, Response, Routes
from microserve.router.router import Router
from microserve.router.workers import WorkerSpec

AdminHandler = Callable[[Router, Request], Awaitable[Response]]


def add_admin_routes(routes: Routes, router: Router) -> None:
    for method, path, handler in (
        ("GET", "/admin/workers", list_workers),
        ("POST", "/admin/workers", add_worker),
        ("DELETE", "/admin/workers", remove_worker),
        ("POST", "/admin/workers/drain", drain_worker),
        ("GET", "/admin/strategy", get_strategy),
        ("PUT", "/admin/strategy", set_strategy),
        ("GET", "/admin/policy", get_policy),
        ("PUT", "/admin/policy", set_policy),
    ):
        routes.add(method, path, functools.partial(_authorized, handler, router))


async def _authorized(handler: AdminHandler, router: Router, request: Request) -> Response:
    token = router.config.admin_token
    if not token:
        raise APIError(403, "The admin API is off: start the router with --admin-token.", code="admin_off")
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    # compare_digest: the time taken must not tell how much of a guessed token was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise APIError(
            401,
            "A valid admin token is required: send it as 'Authorization: Bearer <token>'.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return await handler(router, request)


def _object(request: Request) -> dict[str, Any]:
    body = request.json()
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _url(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise bad_request("url must be the worker's URL.", param="url")
    return value


def _worker_not_found(url: str) -> APIError:
    return APIError(404, f"There is no worker {url!r}.", param="url", code="worker_not_found")


async def list_workers(router: Router, request: Request) -> Response:
    workers = [{**w.describe(), "source": router.source_of(w.url)} for w in router.pool]
    return Response.json({"workers": workers})


async def add_worker(router: Router, request: Request) -> Response:
    try:
        spec = WorkerSpec.from_dict(_object(request))
    except (ValueError, TypeError) as exc:
        raise bad_request(f"Invalid worker: {exc}") from None
    if spec.url in router.pool:
        raise APIError(409, f"Worker {spec.url} is already in the pool.", param="url", code="worker_exists")
    worker = await router.add_worker(spec)
    return Response.json({"worker": worker.describe()}, status=201)


async def remove_worker(router: Router, request: Request) -> Response:
    url = _url(request.query.get("url"))
    try:
        worker = router.remove_worker(url)
    except KeyError:
        raise _worker_not_found(url) from None
    return Response.json({"removed": worker.describe()})


async def drain_worker(router: Router, request: Request) -> Response:
    body = _object(request)
    url = _url(body.get("url"))
    draining = body.get("drain", True)
    if not isinstance(draining, bool):
        raise bad_request("drain must be true or false.", param="drain")
    try:
        worker = router.drain_worker(url, draining)
    except KeyError:
        raise _worker_not_found(url) from None
    return Response.json({"worker": worker.describe()})


def _name_and_options(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    name, options = body.get("name"), body.get("options") or {}
    if not isinstance(name, str) or not name:
        raise bad_request("name is required.", param="name")
    if not isinstance(options, dict):
        raise bad_request("options must be an object.", param="options")
    return name, options


async def get_strategy(router: Router, request: Request) -> Response:
    return Response.json(router.strategy.describe())


async def set_strategy(router: Router, request: Request) -> Response:
    name, options = _name_and_options(_object(request))
    try:
        strategy = await router.set_strategy(name, options)
    except ValueError as exc:
        raise bad_request(str(exc), param="name") from None
    return Response.json(strategy.describe())


async def get_policy(router: Router, request: Request) -> Response:
    return Response.json(router.policy.describe())


async def set_policy(router: Router, request: Request) -> Response:
    name, options = _name_and_options(_object(request))
    try:
        policy = await router.set_policy(name, options)
    except ValueError as exc:
        raise bad_request(str(exc), param="name") from None
    return Response.json(policy.describe())
