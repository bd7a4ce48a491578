"""The `Router`: owns the worker pool, the current policy and strategy, the shared HTTP clients, health
checks, admission and metrics; strategies reach workers through its `pick`. One per app, no globals."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from microserve.api.errors import APIError, bad_request, model_not_found
from microserve.http.client import ClientError, HTTPClient
from microserve.router.admission import AdmissionQueue, no_worker_ready, pool_capacity
from microserve.router.attempts import RetryLoop
from microserve.router.config import RouterConfig
from microserve.router.discovery import DiscoveryCollector, DiscoveryFleet, make_discovery
from microserve.router.fair_share import FairShare
from microserve.router.health import HealthChecker
from microserve.router.kube_scaler import DeploymentScaler, ScalerCollector
from microserve.router.metrics import RouterMetrics
from microserve.router.policies import Policy, make_policy
from microserve.router.prompt_ids import TokenizerCache
from microserve.router.recent import RecentRequests
from microserve.router.request import Route, RoutedRequest
from microserve.router.retry import RetryBudget
from microserve.router.shared_state import SharedStateCollector, make_shared_state
from microserve.router.strategies import Strategy, make_strategy
from microserve.router.upstream import HTTPWorkerHandle, Upstream
from microserve.router.workers import NoWorkerAvailable, Role, Worker, WorkerKind, WorkerPool, WorkerSpec
from microserve.tenants.cache import ResponseCache
from microserve.tenants.gateway import Gateway, open_store
from microserve.tenants.metrics import TenantsCollector
from microserve.tenants.semantic import DEFAULT_STYLE, FleetEmbedder, SemanticCache
from microserve.tracing import Tracing

log = logging.getLogger(__name__)


def no_worker_available(message: str) -> APIError:
    return APIError(503, message, code="no_worker_available", headers={"Retry-After": "1"})


class Router:
    def __init__(
        self, config: RouterConfig, *, rng: random.Random | None = None, tracing: Tracing | None = None
    ) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.tracing = tracing  # spans (OTEL_* variables, Tracing.from_env); shut down by `close`
        self.pool = WorkerPool(config.circuit_breaker)
        for spec in config.workers:
            self.pool.add(spec)
        self.policy: Policy = make_policy(config.policy, config.policy_options)
        self.strategy: Strategy = make_strategy(config.strategy, config.strategy_options)
        self.strategy.bind(self)
        per_worker = config.admission.per_worker
        self.admission = AdmissionQueue(
            config.admission, lambda: pool_capacity(self.pool, per_worker, self.strategy.roles)
        )
        # The admission queue's order; without keys every request is one tenant's: nothing to share.
        self.fair_share = FairShare(enabled=config.fair_share and bool(config.api_keys))
        self.retry_budget = RetryBudget(config.retry)
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.recent = RecentRequests()
        self.metrics = RouterMetrics(
            lambda: self.pool, self.admission, self.decisions, self.recent, self._names
        )
        self.retry_loop = RetryLoop(
            config.retry,
            self.retry_budget,
            self.rng,
            on_retry=self.metrics.retries.inc,
            on_budget_exhausted=self.metrics.retry_budget_exhausted.inc,
        )
        self.tokenizers = TokenizerCache(config.tokenizers, self._max_model_len)
        self._static = {spec.url for spec in config.workers}  # the rest came from the admin API or discovery
        sources = [make_discovery(url) for url in config.discovery]
        self.discovery = DiscoveryFleet(self.pool, sources, config.drain_timeout_s)
        if self.discovery:
            self.metrics.registry.register(DiscoveryCollector(self.discovery))
        self.k8s_scaler: DeploymentScaler | None = (
            None  # --k8s-scale: made in `start` (it reads a kubeconfig)
        )
        self._k8s_task: asyncio.Task[None] | None = None
        # Prefix index, loads and circuits shared with other replicas (--shared-state), else in-process.
        self.shared_state = make_shared_state(config.shared_state)
        self.shared_state.bind(lambda: self.pool, lambda: self.policy)
        self.metrics.registry.register(SharedStateCollector(self.shared_state))
        same_redis = config.api_keys is not None and config.api_keys == config.shared_state
        redis_client = getattr(self.shared_state, "client", None) if same_redis else None
        self.tenants = Gateway(open_store(config.api_keys, redis_client)) if config.api_keys else None
        self.response_cache = (
            ResponseCache.open(
                config.response_cache, config.response_cache_ttl_s, config.response_cache_bytes
            )
            if config.response_cache
            else None
        )
        self.semantic_cache = (
            SemanticCache.open(
                config.semantic_cache,
                config.response_cache,
                config.response_cache_ttl_s,
                self.response_cache.backend,
                FleetEmbedder(
                    functools.partial(self.forward_to_engine, kind=None),
                    config.semantic_cache_model,
                    "plain" if config.semantic_cache_model else DEFAULT_STYLE,
                ),
            )
            if config.semantic_cache is not None and config.response_cache and self.response_cache
            else None
        )
        if self.tenants is not None or self.response_cache is not None:
            self.metrics.registry.register(
                TenantsCollector(self.tenants, self.response_cache, self.semantic_cache)
            )
        self._http: HTTPClient | None = None
        self._control: HTTPClient | None = None
        self._upstream: Upstream | None = None
        self._health: HealthChecker | None = None
        self.draining = False  # shutting down: /ready says 503; what arrives on open connections is answered

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        # One client stack, two pools: requests' traffic, and verbs/health/load (see `Upstream`).
        tls = self.config.worker_tls()  # https:// workers: their CA, and our certificate (mutual TLS)
        self._http = HTTPClient(
            max_connections=self.config.max_connections, keepalive_s=60.0, ssl_context=tls
        )
        self._control = HTTPClient(
            max_connections=self.config.max_connections, keepalive_s=60.0, ssl_context=tls
        )
        self._upstream = Upstream(
            http=self._http,
            control=self._control,
            internal_token=self.config.internal_token,
            connect_timeout_s=self.config.connect_timeout_s,
            track_streams=self.config.stream_continuation,
            decoder=self._decoder,
            deadlines=self.config.deadlines,
        )
        self._health = HealthChecker(
            self.pool, self._upstream, self.config.health, self._wants_load, self.admission.wake
        )
        await asyncio.gather(*(self._health.first_check(w) for w in self.pool))  # models known now
        await self.discovery.start(self._health.first_check, wait_s=self.config.connect_timeout_s)
        self._health.start()
        await self.shared_state.start()
        if self.config.k8s_scale:
            self.k8s_scaler = DeploymentScaler.from_urls(
                self.config.k8s_scale, lambda: self.pool, lambda: self.admission.queued
            )
            self.metrics.registry.register(ScalerCollector(self.k8s_scaler))
            self._k8s_task = asyncio.create_task(self.k8s_scaler.run(), name="k8s-scale")
        await self._preload_tokenizers(self.strategy, self.policy)

    async def close(self) -> None:
        if self._k8s_task is not None and self.k8s_scaler is not None:
            self._k8s_task.cancel()
            await asyncio.gather(self._k8s_task, return_exceptions=True)
            await self.k8s_scaler.close()
        await self.discovery.stop()
        if self._health is not None:
            await self._health.stop()
        for client in (self._http, self._control):
            if client is not None:
                await client.close()
        if self.tenants is not None:
            await self.tenants.close()
        await self.shared_state.close()
        if self.response_cache is not None:
            await self.response_cache.close()
        if self.semantic_cache is not None:
            await self.semantic_cache.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)

    @property
    def upstream(self) -> Upstream:
        if self._upstream is None:
            raise RuntimeError("the router has not started")
        return self._upstream

    def _wants_load(self) -> bool:
        return self.policy.needs_load

    # -- requests -----------------------------------------------------------------------------------

    def parse(self, route: Route, raw: bytes, headers: Mapping[str, str]) -> RoutedRequest:
        """The client's request, with its model resolved to a pool (404 if no worker serves it).

        While no worker has told its models yet (all down since the start, a fleet scaled to zero) the
        model stays unresolved: admission holds the request, then `resolve_model` runs again."""
        req = RoutedRequest.parse(
            route, raw, headers, timeout_s=self.config.request_timeout_s, tokenize=self.tokenizers.prompt_ids
        )
        if req.model is not None and self.pool.serves(req.model):
            return req  # resolved: the common case, one look at the pool
        if self.pool.has_models():
            self.resolve_model(req)
        return req

    def resolve_model(self, req: RoutedRequest) -> None:
        if req.model is not None and self.pool.serves(req.model):
            return
        default = self.pool.default_model()
        if default is None:
            raise no_worker_ready(
                "No worker is available: none has answered a health check yet.",
                self.config.admission.retry_after_s,
            )
        if req.model is not None:
            raise model_not_found(req.model)
        req.model = default

    async def forward_to_engine(
        self, path: str, body: bytes, kind: WorkerKind | None = WorkerKind.MICROSERVE
    ) -> tuple[int, bytes]:
        """POST `body` to `path` on a microserve engine serving its model (/tokenize, /detokenize), or
        on any worker of the model with `kind=None` (/v1/embeddings: OpenAI-compatible servers have it
        too): the status and body it answers. Any such worker will do; these routes hold no state."""
        try:
            model = orjson.loads(body).get("model") if body else None
        except (orjson.JSONDecodeError, AttributeError):
            raise bad_request("The request body must be a JSON object.") from None
        if model is not None and not isinstance(model, str):
            raise bad_request("model must be a string.", param="model")
        if model is not None and not self.pool.serves(model):
            raise model_not_found(model)
        workers = self.pool.candidates(model, kind=kind)
        if not workers:
            raise no_worker_available("No worker is available to answer this.")
        worker = workers[0]
        up = self.upstream
        headers = {**up.headers_for(worker), "Content-Type": "application/json"}
        try:
            return await up.control.fetch(
                "POST", worker.url, path, body=body, headers=headers,
                timeout_s=self.config.request_timeout_s, connect_timeout_s=self.config.connect_timeout_s,
            )  # fmt: skip
        except (ClientError, TimeoutError) as exc:
            # The engine's address stays in the log: a client never sees the fleet's insides.
            log.warning("POST %s (model %s): %s did not answer: %r", path, model, worker.url, exc)
            raise APIError(502, "The engine did not answer; retry.", code="worker_failed") from None

    def pick(
        self,
        role: Role,
        req: RoutedRequest,
        kind: WorkerKind | None = None,
        *,
        exclude_picked: bool = False,
        least_busy: bool = False,
    ) -> HTTPWorkerHandle:
        """A worker for `req` in `role` from the current policy, counted in flight from now.

        `exclude_picked` prefers a worker not yet picked for this request (a PD pair on two engines);
        `least_busy` takes the one with the fewest requests in flight instead of asking the policy.
        """
        worker = select_worker(
            self.pool,
            self.policy,
            self.decisions,
            role,
            req,
            kind,
            exclude_picked=exclude_picked,
            least_busy=least_busy,
        )
        handle = HTTPWorkerHandle(worker, self.upstream)
        req.handles.append(handle)
        if req.trace is not None:
            reason = "least_busy" if least_busy else self.policy.name
            candidates = len(self.pool.candidates(req.model, role, kind, req.excluded))
            req.trace.pick(str(role), worker, reason, candidates)
        return handle

    async def refresh_loads(self, max_age_s: float) -> None:
        """Load reports no older than `max_age_s` from every healthy worker, for /dashboard (the policy's
        own polling runs only while the policy reads loads)."""
        if self._health is None:
            return
        now = time.monotonic()
        stale = [w for w in self.pool if w.healthy and (w.load is None or now - w.load.at > max_age_s)]
        await asyncio.gather(*(self._health.poll_load(w) for w in stale))

    async def _decoder(self, model: str | None) -> Callable[[list[int]], str] | None:
        if model is None:
            return None
        try:
            tokenizer = await asyncio.to_thread(self.tokenizers.get, model)
        except LookupError as exc:
            log.warning("router: continuing a stream without its tokenizer: %s", exc)
            return None
        return tokenizer.decode

    # -- changes at run time ------------------------------------------------------------------------

    async def set_strategy(self, spec: str, options: dict[str, Any] | None = None) -> Strategy:
        """Swap the strategy; requests in flight finish with the one they started with."""
        strategy = make_strategy(spec, options)
        strategy.bind(self)
        await self._preload_tokenizers(strategy, self.policy)
        self.strategy = strategy
        log.info("router: strategy is now %s", strategy.describe())
        return strategy

    async def set_policy(self, name: str, options: dict[str, Any] | None = None) -> Policy:
        policy = make_policy(name, options)
        await self._preload_tokenizers(self.strategy, policy)
        self.policy = policy
        if policy.needs_load and self._health is not None:
            await self._health.poll_loads()  # fresh reports before the first pick
        log.info("router: policy is now %s", policy.describe())
        return policy

    async def add_worker(self, spec: WorkerSpec) -> Worker:
        worker = self.pool.add(spec)
        self._static.discard(spec.url)
        if self._health is not None:
            await self._health.first_check(worker)
        return worker

    def remove_worker(self, url: str) -> Worker:
        return self.pool.remove(url)

    def source_of(self, url: str) -> str:
        """Where a worker in the pool came from: `static` (flags, YAML), `admin`, or a discovery URL."""
        return self.discovery.source_of(url) or ("static" if url in self._static else "admin")

    def _max_model_len(self, model: str) -> int | None:
        """The model's context as its engines report it in /v1/models (None before any did)."""
        value = self.pool.model_card(model).get("max_model_len")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def drain_worker(self, url: str, draining: bool = True) -> Worker:
        worker = self.pool.get(url)
        worker.draining = draining
        return worker

    async def _preload_tokenizers(self, strategy: Strategy, policy: Policy) -> None:
        """Load the tokenizers a strategy or policy needs now, or refuse it (ValueError) if one is missing."""
        if strategy.needs_prompt_ids or policy.needs_prompt_ids:
            missing = await self.tokenizers.preload(self.pool.models())
            if missing:
                raise ValueError(f"token ids are needed, but {'; '.join(missing)} (see --tokenizer)")

    def _names(self) -> tuple[str, str]:
        return self.strategy.name or type(self.strategy).__name__, self.policy.name

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.strategy.describe(), "policy": self.policy.describe()}


def select_worker(
    pool: WorkerPool,
    policy: Policy,
    decisions: Counter[tuple[str, str]],
    role: Role,
    req: Any,
    kind: WorkerKind | None = None,
    *,
    exclude_picked: bool = False,
    least_busy: bool = False,
) -> Worker:
    """The worker a pick lands on: the pool's candidates for the role, then the policy (or the least
    busy); counted in `decisions`. Shared by the router and the simulator's host."""
    exclude = req.excluded | {h.url for h in req.handles} if exclude_picked else req.excluded
    candidates = pool.candidates(req.model, role, kind, exclude)
    if not candidates:
        what = "worker" if role is Role.BOTH else f"{role} worker"
        what = f"{kind} {what}" if kind else what
        raise NoWorkerAvailable(
            f"No {what} is available for model {req.model!r} (down, draining or failing); retry later."
        )
    if least_busy:
        worker = min(candidates, key=lambda w: w.fleet_in_flight)
        decisions[("least_busy", worker.url)] += 1
    else:
        worker = policy.select(candidates, req)
        decisions[(policy.name, worker.url)] += 1
    return worker
