"""Serve an engine app on a free loopback port for a test, with an aiohttp client pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from microserve.server.app import EngineApp


@asynccontextmanager
async def client_of(app: EngineApp) -> AsyncIterator[aiohttp.ClientSession]:
    """`app` started (its startup hooks run) and a client whose paths are relative to it; on exit the
    client closes, then the app drains and runs its cleanup hooks."""
    async with app, aiohttp.ClientSession(base_url=app.url) as client:
        yield client
