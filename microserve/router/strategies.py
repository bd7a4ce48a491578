"""Strategies turn one client request into calls on workers; each is a few lines of an async generator.

A strategy yields the bytes the client receives: one JSON body for a non-streamed request, SSE frames
for a streamed one. The router retries the whole `serve` on another pick while nothing was yielded, and
calls `resume` when a stream breaks after that. Built in: `data_parallel`, `pd`, `pd_cache_aware`,
`pd_balanced` (ratio) and `migration`. A user strategy loads from a Python file (`path.py:ClassName`)
and, like the policy, can be swapped at run time.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar, Protocol

from microserve.api.errors import APIError
from microserve.router.request import RoutedRequest
from microserve.router.upstream import BrokenStream
from microserve.router.worker_handle import WorkerHandle
from microserve.router.workers import ROLE_BOTH, Role, WorkerKind


def empty_answer() -> APIError:
    """A strategy that ended without yielding anything: the client gets a 502, not an empty 200."""
    return APIError(502, "The strategy ended without an answer.", code="empty_answer")


class StrategyHost(Protocol):
    """What a strategy may ask of the router."""

    def pick(
        self,
        role: Role,
        req: RoutedRequest,
        kind: WorkerKind | None = None,
        *,
        exclude_picked: bool = False,
        least_busy: bool = False,
    ) -> WorkerHandle: ...


class Strategy:
    """Subclass, set `name`, write `serve` as an async generator; options come as keyword arguments.

    `self.pick(role, req)` asks the current policy for a worker of that role ("prefill", "decode" or
    "both") serving the request's model, counts it in flight, and returns its `WorkerHandle`. Set
    `needs_prompt_ids = True` if `serve` reads `req.prompt_ids`, so the router loads the tokenizer
    before traffic arrives. `roles` names the roles every request needs a worker of (a "both" worker
    counts for any; PD sets prefill and decode): while one has none available, admission holds requests,
    so a pool scaled to zero wakes instead of failing them.
    """

    name: ClassVar[str] = ""
    needs_prompt_ids: ClassVar[bool] = False
    roles: ClassVar[tuple[Role, ...]] = ()

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"{type(self).__name__} takes no option(s) {', '.join(sorted(options))}")
        self._host: StrategyHost | None = None

    def bind(self, host: StrategyHost) -> None:
        self._host = host

    def pick(
        self,
        role: Role | str,
        req: RoutedRequest,
        kind: WorkerKind | str | None = None,
        *,
        exclude_picked: bool = False,
        least_busy: bool = False,
    ) -> WorkerHandle:
        if self._host is None:
            raise RuntimeError("the strategy is not bound to a router")
        return self._host.pick(
            role if isinstance(role, Role) else Role(role),  # a member already: no enum call per request
            req,
            kind if kind is None or isinstance(kind, WorkerKind) else WorkerKind(kind),
            exclude_picked=exclude_picked,
            least_busy=least_busy,
        )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "serve" in cls.__dict__ and "serve_whole" not in cls.__dict__:
            cls.serve_whole = Strategy.serve_whole  # type: ignore[method-assign]  # a new serve answers whole too

    def serve(self, req: RoutedRequest) -> AsyncIterator[bytes]:
        raise NotImplementedError(f"{type(self).__name__} must define `async def serve(self, req)`")

    async def serve_whole(self, req: RoutedRequest) -> bytes:
        """A non-streamed request's answer: by default what `serve` yields, joined. A strategy may
        override it with a plain coroutine, skipping the generators (`DataParallel` does); a subclass
        that overrides `serve` alone gets this default back."""
        chunks = [chunk async for chunk in self.serve(req)]
        if not chunks:
            raise empty_answer()
        return b"".join(chunks)

    async def resume(self, req: RoutedRequest, broken: BrokenStream) -> AsyncIterator[bytes]:
        """Continue a stream that broke mid-way: by default on another microserve engine that can decode."""
        assert broken.progress is not None
        worker = self.pick(Role.DECODE, req, WorkerKind.MICROSERVE)
        async for chunk in worker.resume(req, broken.progress):
            yield chunk

    def options(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name or type(self).__name__, "options": self.options()}


class DataParallel(Strategy):
    """The policy picks one worker; the request goes there whole."""

    name = "data_parallel"

    def serve(self, req: RoutedRequest) -> AsyncIterator[bytes]:
        # The worker's own stream, not one relayed through a generator of this strategy's: one
        # generator less a chunk. (Written by hand it is `async for chunk in ...generate(req): yield chunk`.)
        return self.pick(ROLE_BOTH, req).generate(req)

    async def serve_whole(self, req: RoutedRequest) -> bytes:
        return await self.pick(ROLE_BOTH, req).generate_whole(req)


class PrefillDecode(Strategy):
    """Prefill-decode disaggregation: a prefill worker computes the prompt's KV and pushes it to a
    decode worker, which commits the last prompt token itself and decodes. Only the part of the prompt
    the decode worker does not hold already travels."""

    name = "pd"
    needs_prompt_ids = True
    roles = (Role.PREFILL, Role.DECODE)

    def split(self, req: RoutedRequest) -> int:
        """Where the decode worker's own prefill starts; everything before it arrives as KV."""
        return len(req.prompt_ids) - 1

    async def serve(self, req: RoutedRequest) -> AsyncIterator[bytes]:
        p, d = self.pick("prefill", req), self.pick("decode", req, exclude_picked=True)
        if req.served_whole:  # a batch of prompts, or prompt logprobs: the decode worker does it all
            p.release()
            async for chunk in d.generate(req):
                yield chunk
            return
        split = self.split(req)
        if split > 0:
            addr = await d.prep_recv(req, end=split)
            if self.should_send(addr.matched, split):
                try:
                    await p.remote_send(req, addr, dst=d, begin=addr.matched, end=split)
                except BaseException:
                    await d.release_kv(req)
                    raise
            else:
                split = addr.matched  # the decode worker computes the short rest itself
        p.release()
        async for chunk in d.start_generate(req, begin=split):
            yield chunk

    def should_send(self, matched: int, split: int) -> bool:
        return matched < split


class CacheAwarePD(PrefillDecode):
    """PD that skips the prefill worker when the decode worker's prefix cache already holds all but
    `min_transfer` tokens of the prompt (multi-turn chats coming back to the engine that served them)."""

    name = "pd_cache_aware"

    def __init__(self, min_transfer: int = 256, **options: Any) -> None:
        super().__init__(**options)
        if min_transfer < 0:
            raise TypeError(f"min_transfer must be non-negative, got {min_transfer}")
        self.min_transfer = min_transfer

    def should_send(self, matched: int, split: int) -> bool:
        return split - matched > self.min_transfer

    def options(self) -> dict[str, Any]:
        return {"min_transfer": self.min_transfer}


class BalancedPD(PrefillDecode):
    """PD in which the decode worker also prefills the last `ratio` of the prompt, balancing the two."""

    name = "pd_balanced"

    def __init__(self, ratio: float = 0.2, **options: Any) -> None:
        super().__init__(**options)
        if not 0.0 <= ratio < 1.0:
            raise TypeError(f"ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio

    def split(self, req: RoutedRequest) -> int:
        n = len(req.prompt_ids)
        return min(int(n * (1 - self.ratio)), n - 1)

    def options(self) -> dict[str, Any]:
        return {"ratio": self.ratio}


class ContextMigration(Strategy):
    """Keep a conversation on the worker the policy picks for it (use consistent_hash for affinity);
    when that worker is busier than `max_in_flight`, move the conversation's context to the least busy
    other worker and continue there, instead of recomputing it."""

    name = "migration"
    needs_prompt_ids = True

    def __init__(self, max_in_flight: int = 8, **options: Any) -> None:
        super().__init__(**options)
        if max_in_flight < 0:  # 0: every request moves (a demonstration, and the tests)
            raise TypeError(f"max_in_flight must be non-negative, got {max_in_flight}")
        self.max_in_flight = max_in_flight

    async def serve(self, req: RoutedRequest) -> AsyncIterator[bytes]:
        home = self.pick("both", req)
        if home.busy <= self.max_in_flight or home.kind is not WorkerKind.MICROSERVE or req.served_whole:
            async for chunk in home.generate(req):
                yield chunk
            return
        target = self.pick("both", req, kind=WorkerKind.MICROSERVE, exclude_picked=True, least_busy=True)
        end = len(req.prompt_ids) - 1
        addr = await target.prep_recv(req, end=end)
        if addr.matched < end:
            try:
                await home.remote_send(req, addr, dst=target, begin=addr.matched, end=end)
            except BaseException:
                await target.release_kv(req)
                raise
        home.release()
        async for chunk in target.start_generate(req, begin=end):
            yield chunk

    def options(self) -> dict[str, Any]:
        return {"max_in_flight": self.max_in_flight}


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (DataParallel, PrefillDecode, CacheAwarePD, BalancedPD, ContextMigration)
}


def make_strategy(spec: str, options: dict[str, Any] | None = None) -> Strategy:
    """A strategy by built-in name, or `path/to/file.py:ClassName`; ValueError says what is wrong."""
    cls = STRATEGIES.get(spec)
    if cls is None:
        if ":" not in spec:
            raise ValueError(
                f"unknown strategy {spec!r}: use one of {', '.join(STRATEGIES)} or path/to/file.py:ClassName"
            )
        path, _, class_name = spec.rpartition(":")
        cls = load_strategy_class(Path(path), class_name)
    try:
        return cls(**(options or {}))
    except TypeError as exc:
        raise ValueError(f"bad options for strategy {spec}: {exc}") from None


def load_strategy_class(path: Path, class_name: str) -> type[Strategy]:
    """Import `path` as a fresh module (loading it again picks up edits) and take its `class_name`."""
    if not path.is_file():
        raise ValueError(f"strategy file {str(path)!r} does not exist")
    module_name = f"microserve_user_strategy_{path.stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {str(path)!r} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ValueError(f"importing {str(path)!r} failed: {exc!r}") from None
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ValueError(f"{str(path)!r} has no Strategy subclass named {class_name!r}")
    owner = next(k for k in cls.__mro__ if "serve" in vars(k))  # whose `serve` it runs
    if owner.__module__ != __name__ and not inspect.isasyncgenfunction(cls.serve):
        raise ValueError(f"{class_name}.serve must be an async generator (`async def` with `yield`)")
    return cls
