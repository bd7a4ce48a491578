"""The tenant gateway a router consults for every OpenAI request: who is calling (the bearer key), may
they use this model, do their limits let the request through, and at which priority it queues.

Handlers stay thin: `dispatch` calls `authenticate`, then `admit`, and `finish` when the answer ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from microserve.api.errors import APIError
from microserve.tenants.keys import PRIORITIES, KeyRecord, digest
from microserve.tenants.limits import Grant, Limiter
from microserve.tenants.store import MemoryStore, TenantStore

log = logging.getLogger(__name__)

PRIORITY_HEADER = "x-priority"
DEFAULT_RESERVE_TOKENS = 256  # a chat request without max_tokens reserves this many completion tokens
BYTES_PER_TOKEN = 4  # the prompt is estimated from its length until the answer's usage says exactly


def open_store(source: str, redis_client: Any = None) -> TenantStore:
    """`redis://…` (or `rediss://`, `unix://`): shared by replicas (through `redis_client` when the
    router already holds one for that Redis); `memory`: this process only, until it stops; anything else
    is the path of a keys file."""
    if source == "memory":
        return MemoryStore()
    if source.startswith(("redis://", "rediss://", "unix://")):
        from microserve.tenants.redis_store import RedisStore  # only a router given Redis needs the client

        return RedisStore(source, client=redis_client)
    return MemoryStore(source)


def invalid_api_key(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def model_not_allowed(model: str) -> APIError:
    # As OpenAI answers a model the key's project may not use.
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


@dataclass(slots=True)
class Ticket:
    """A request let in: its key, the rank it queues at, and its grant to settle at the end."""

    record: KeyRecord
    rank: int
    grant: Grant
    prompt_estimate: int

    @property
    def tenant(self) -> str:
        return self.record.tenant

    @property
    def headers(self) -> dict[str, str]:
        return self.grant.headers


class Gateway:
    def __init__(self, store: TenantStore, limiter: Limiter | None = None) -> None:
        self.store = store
        self.limiter = limiter or Limiter(store)
        self._settling: set[asyncio.Task[None]] = set()
        self.refused: Counter[str] = Counter()  # invalid_api_key, model_not_allowed

    async def authenticate(self, headers: Mapping[str, str]) -> KeyRecord:
        given = headers.get("authorization", "")
        scheme, _, secret = given.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            self.refused["invalid_api_key"] += 1
            raise invalid_api_key("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        # Looked up by digest: the secret is never compared (nor stored, nor logged) as itself.
        record = await self.store.key_by_hash(digest(secret))
        if record is None:
            self.refused["invalid_api_key"] += 1
            raise invalid_api_key("Incorrect API key provided (unknown or revoked).")
        return record

    async def admit(
        self,
        record: KeyRecord,
        model: str | None,
        headers: Mapping[str, str],
        prompt_chars: int,
        max_tokens: int | None,
    ) -> Ticket:
        """Check the model (when named) and count the request against the key's limits."""
        if model is not None:
            self.check_model(record, model)
        requested = headers.get(PRIORITY_HEADER)
        if requested is not None and requested not in PRIORITIES:
            raise APIError(
                400,
                f"x-priority must be one of {', '.join(PRIORITIES)}.",
                param=PRIORITY_HEADER,
                code="invalid_priority",
            )
        prompt_estimate = prompt_chars // BYTES_PER_TOKEN + 1
        reserve = prompt_estimate + (DEFAULT_RESERVE_TOKENS if max_tokens is None else max_tokens)
        grant = await self.limiter.admit(record, reserve)
        return Ticket(record, record.rank(requested), grant, prompt_estimate)

    def check_model(self, record: KeyRecord, model: str) -> None:
        if not record.allows(model):
            self.refused["model_not_allowed"] += 1
            raise model_not_allowed(model)

    def finish(self, ticket: Ticket, used_tokens: int | None) -> None:
        """Settle in the background: the answer is not held up, and a cancelled request still settles."""
        task = asyncio.get_running_loop().create_task(self._settle(ticket, used_tokens))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, ticket: Ticket, used_tokens: int | None) -> None:
        try:
            await self.limiter.settle(ticket.grant, used_tokens)
        except Exception:
            log.exception("tenants: settling a request of tenant %s failed", ticket.tenant)

    def refusals(self) -> Iterator[tuple[str, int]]:
        """(reason, count): a key refused, or one of its limits reached."""
        yield from sorted(self.refused.items())
        yield from sorted(self.limiter.refused.items())

    async def close(self) -> None:
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        await self.store.close()
