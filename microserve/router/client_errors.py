"""What a client hears when the fleet fails its request: a clean OpenAI error that names the request id,
never an internal address or an upstream's raw 5xx body (those go to the log, under the same id)."""

from __future__ import annotations

import logging
import re

import orjson

from microserve.api.errors import APIError, error_body
from microserve.router.upstream import UpstreamHTTPError, WorkerFailure, WorkerUnreachable

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
RETRY_AFTER_S = "1"  # serve restarts a dead engine within a second; health checks bring it back
_CODE = re.compile(r"[a-z][a-z0-9_]{0,47}")  # an upstream's error code passes only if it is a plain name


def _with_id(message: str, request_id: str) -> str:
    return f"{message} (request id {request_id})"


def upstream_error(exc: UpstreamHTTPError, request_id: str) -> APIError:
    """A worker's error status, for the client. A 4xx in OpenAI's shape is the client's to read and
    passes (status, message, code, Retry-After); a 5xx, or any body not in that shape, is logged and
    replaced by a message of our own that keeps only the status and a plain error code."""
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "retry-after"}
    headers[REQUEST_ID_HEADER] = request_id
    err = _openai_error(exc.body)
    if exc.status < 500 and err is not None:
        message = str(err.get("message", "")) or f"The model server refused the request (HTTP {exc.status})."
        type_, param = err.get("type"), err.get("param")
        type_ = type_ if isinstance(type_, str) else None
        param = param if isinstance(param, str) else None
        return APIError(exc.status, message, type=type_, param=param, code=_code(err), headers=headers)
    log.warning(
        "request %s: worker %s answered HTTP %d: %s",
        request_id,
        exc.worker.url,
        exc.status,
        exc.body[:2000].decode(errors="replace"),
    )
    if exc.status < 500:
        message = f"The model server refused the request (HTTP {exc.status})."
        return APIError(exc.status, _with_id(message, request_id), code=None, headers=headers)
    status = 503 if exc.status == 503 else 502
    if status == 503:
        headers.setdefault("Retry-After", RETRY_AFTER_S)
    message = f"The model server failed to answer (HTTP {exc.status})."
    code = _code(err) if err is not None else None
    return APIError(status, _with_id(message, request_id), code=code or "upstream_error", headers=headers)


def no_answer(last: WorkerFailure, request_id: str) -> APIError:
    """Every attempt failed: 503 with Retry-After when no worker could be reached (all down: retrying
    soon may find one restarted), else 502; the workers' addresses and errors only in the log."""
    if isinstance(last, UpstreamHTTPError):
        return upstream_error(last, request_id)
    log.warning("request %s: no worker answered; last: %s: %s", request_id, last.worker.url, last.message)
    headers = {REQUEST_ID_HEADER: request_id}
    if isinstance(last, WorkerUnreachable):
        headers["Retry-After"] = RETRY_AFTER_S
        message = _with_id("No worker is reachable now; retry shortly.", request_id)
        return APIError(503, message, code="no_worker_available", headers=headers)
    message = _with_id("No worker could answer this request.", request_id)
    return APIError(502, message, code="upstream_failed", headers=headers)


def stream_error_event(what: str, detail: str, request_id: str) -> bytes:
    """The SSE error event that ends a broken stream (no [DONE] after it); `detail` goes to the log."""
    log.warning("request %s: %s: %s", request_id, what, detail)
    body = error_body(_with_id(what + ".", request_id), "server_error", code="worker_failed")
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _openai_error(body: bytes) -> dict[str, object] | None:
    try:
        err = orjson.loads(body)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return err if isinstance(err, dict) and isinstance(err.get("message"), str) else None


def _code(err: dict[str, object]) -> str | None:
    code = err.get("code")
    return code if isinstance(code, str) and _CODE.fullmatch(code) else None
