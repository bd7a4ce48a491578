"""The few API calls microserve makes, on aiohttp: list pods, watch them (newline-delimited JSON events
from a resourceVersion, 410 Gone when it is too old), and get / patch a Deployment's scale subresource."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp

from microserve.kube.config import KubeConfig


class KubeError(Exception):
    """The API server could not be reached, or answered with an error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Gone(KubeError):
    """410: the resourceVersion asked for is older than the server keeps; list again."""


class KubeClient:
    def __init__(self, config: KubeConfig, *, timeout_s: float = 10.0) -> None:
        self.config = config
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ssl_ctx = self.config.ssl_context()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_ctx if ssl_ctx is not None else False)
            )
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.config.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _json(self, method: str, path: str, params: dict[str, str] | None = None,
                    body: Any = None, content_type: str | None = None) -> Any:  # fmt: skip
        url = self.config.server + path
        try:
            async with self._http().request(
                method,
                url,
                params=params,
                data=None if body is None else json.dumps(body),
                headers=self._headers(content_type),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise _error(method, path, resp.status, text)
                return json.loads(text)
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            raise KubeError(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    async def list_pods(self, namespace: str, selector: str) -> dict[str, Any]:
        params = {"labelSelector": selector} if selector else {}
        return dict(await self._json("GET", f"/api/v1/namespaces/{quote(namespace)}/pods", params))

    async def watch_pods(self, namespace: str, selector: str, resource_version: str,
                         timeout_s: int = 60) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """Watch events (`{"type": ..., "object": ...}`) until the server ends the watch (its timeout);
        Gone when the version is too old, whether as an HTTP 410 or as an ERROR event."""
        path = f"/api/v1/namespaces/{quote(namespace)}/pods"
        params = {"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_s)}  # fmt: skip
        if selector:
            params["labelSelector"] = selector
        # No total timeout: a watch is quiet for long; the server ends it at `timeoutSeconds`, and a
        # read that stalls well past that means the connection is dead.
        timeout = aiohttp.ClientTimeout(connect=self.timeout_s, sock_connect=self.timeout_s,
                                        sock_read=timeout_s + self.timeout_s)  # fmt: skip
        try:
            async with self._http().get(
                self.config.server + path, params=params, headers=self._headers(), timeout=timeout
            ) as resp:
                if resp.status >= 400:
                    raise _error("GET", path, resp.status, await resp.text())
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        raise _error("WATCH", path, int(status.get("code") or 500), json.dumps(status))
                    yield event
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            raise KubeError(f"watch {path}: {type(exc).__name__}: {exc}") from None

    def _scale_path(self, namespace: str, deployment: str) -> str:
        return f"/apis/apps/v1/namespaces/{quote(namespace)}/deployments/{quote(deployment)}/scale"

    async def get_scale(self, namespace: str, deployment: str) -> int:
        scale = await self._json("GET", self._scale_path(namespace, deployment))
        return int((scale.get("spec") or {}).get("replicas") or 0)

    async def patch_scale(self, namespace: str, deployment: str, replicas: int) -> int:
        scale = await self._json(
            "PATCH",
            self._scale_path(namespace, deployment),
            body={"spec": {"replicas": replicas}},
            content_type="application/merge-patch+json",
        )
        return int((scale.get("spec") or {}).get("replicas") or 0)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _error(method: str, path: str, status: int, text: str) -> KubeError:
    try:
        message = json.loads(text).get("message") or text
    except (ValueError, AttributeError):
        message = text
    cls = Gone if status == 410 else KubeError
    return cls(f"{method} {path}: {status} {str(message)[:200]}", status)
