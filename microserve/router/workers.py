"""The workers behind the router: what each one is (URL, kind, role, labels, weight, models) and what the
router knows of it right now (requests in flight, reported load, health, circuit), kept in a `WorkerPool`."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from microserve.http.urls import base_url
from microserve.router.breaker import BreakerConfig, CircuitBreaker, CircuitState


class WorkerKind(StrEnum):
    MICROSERVE = "microserve"  # a microserve engine: /load, return_token_ids, the microserving verbs
    OPENAI = "openai"  # any OpenAI-compatible server: vLLM, SGLang, llama.cpp server, Ollama…


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    def can(self, wanted: Role) -> bool:
        """Can a worker of this role take work of role `wanted`? `both` does everything."""
        return self is ROLE_BOTH or self is wanted


# On Python 3.11 reading a member through its class (`Role.BOTH`) goes through the enum metaclass's
# attribute hook (it defines `__getattr__`): about 60 ns, five times a plain class attribute. Code that
# runs per request compares with these module constants.
ROLE_BOTH = Role.BOTH
KIND_MICROSERVE = WorkerKind.MICROSERVE


def _enum(cls: type[StrEnum], value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ValueError(f"{what} must be one of {choices}; got {value!r}") from None


@dataclass(slots=True, frozen=True)
class WorkerSpec:
    """How a worker is configured, from flags, the YAML file or the admin API."""

    url: str
    kind: WorkerKind = WorkerKind.MICROSERVE
    role: Role = Role.BOTH
    weight: int = 1
    labels: Mapping[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()  # empty: asked from the worker's /v1/models
    api_key: str | None = None  # sent as a bearer token to OpenAI-compatible servers that want one

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", base_url(self.url))
        object.__setattr__(self, "kind", _enum(WorkerKind, self.kind, "kind"))
        object.__setattr__(self, "role", _enum(Role, self.role, "role"))
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or self.weight < 1:
            raise ValueError(f"weight must be a positive integer, got {self.weight!r}")
        object.__setattr__(self, "labels", {str(k): str(v) for k, v in dict(self.labels).items()})
        models = (self.models,) if isinstance(self.models, str) else tuple(self.models)
        object.__setattr__(self, "models", tuple(str(m) for m in models))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorkerSpec:
        if not isinstance(d, Mapping):
            raise ValueError(f"a worker is an object with at least a url, got {d!r}")
        known = {"url", "kind", "role", "weight", "labels", "models", "api_key"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown worker field(s): {', '.join(unknown)}")
        if "url" not in d:
            raise ValueError("a worker needs a url")
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        """`URL[,key=value…]`, keys: kind, role, weight, model (repeatable), label.NAME, api_key."""
        url, *pairs = [p.strip() for p in text.split(",")]
        fields: dict[str, Any] = {"url": url}
        labels: dict[str, str] = {}
        models: list[str] = []
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"expected key=value after the URL in {text!r}, got {pair!r}")
            if key == "model":
                models.append(value)
            elif key.startswith("label."):
                labels[key[len("label.") :]] = value
            elif key == "weight":
                try:
                    fields["weight"] = int(value)
                except ValueError:
                    raise ValueError(f"weight must be an integer, got {value!r}") from None
            elif key in ("kind", "role", "api_key"):
                fields[key] = value
            else:
                raise ValueError(f"unknown worker option {key!r} in {text!r}")
        return cls(**fields, labels=labels, models=tuple(models))

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "kind": str(self.kind),
            "role": str(self.role),
            "weight": self.weight,
            "labels": dict(self.labels),
            "models": list(self.models),
        }


@dataclass(slots=True, frozen=True)
class LoadReport:
    """What a worker last said about its load (from /load or /metrics), and when it was read."""

    waiting: int
    running: int
    kv_usage: float
    at: float
    prefix_hit_rate: float | None = None  # microserve engines report it; other servers do not
    step_s: float | None = None  # the engine's smoothed step time (microserve engines), for deadlines
    max_num_seqs: int | None = None  # how many requests the engine runs at once, for admission


class Worker:
    """One worker as the router sees it now; policies read it, the proxy and health checks update it."""

    __slots__ = (
        "_spec",
        "breaker",
        "draining",
        "errors",
        "healthy",
        "in_flight",
        "kind",
        "load",
        "model_cards",
        "models",
        "remote_in_flight",
        "requests",
        "role",
        "sent_since_report",
        "url",
        "weight",
    )

    def __init__(self, spec: WorkerSpec, breaker: CircuitBreaker | None = None) -> None:
        self.spec = spec
        self.url = spec.url
        self.breaker = breaker or CircuitBreaker()
        # Optimistic until the first active check: a router with static workers serves at once.
        self.healthy = True
        self.draining = False
        self.models: set[str] = set(spec.models)
        self.model_cards: dict[str, dict[str, Any]] = {}  # the worker's /v1/models entries, by id
        self.in_flight = 0  # from this router
        self.remote_in_flight = 0  # from the other router replicas sharing state (as last synchronised)
        self.load: LoadReport | None = None
        self.sent_since_report = 0  # dispatched after the last load report, so not in it yet
        self.requests = 0
        self.errors: Counter[str] = Counter()

    @property
    def spec(self) -> WorkerSpec:
        return self._spec

    @spec.setter
    def spec(self, spec: WorkerSpec) -> None:
        """What the worker is (discovery may change it, its URL aside); the fields read per request
        are kept beside it, as plain attributes (read them, never set them)."""
        self._spec = spec
        self.kind: WorkerKind = spec.kind
        self.role: Role = spec.role
        self.weight: int = spec.weight

    @property
    def fleet_in_flight(self) -> int:
        """Requests in flight on this worker from every router replica: what policies balance on."""
        return self.in_flight + self.remote_in_flight

    @property
    def available(self) -> bool:
        """Takes new requests: healthy, not draining, circuit not open."""
        breaker = self.breaker
        return self.healthy and not self.draining and (breaker.closed or breaker.allows())

    def acquire(self) -> None:
        """Count a request as in flight from the moment it is dispatched (least_connections relies on it)."""
        self.in_flight += 1
        self.sent_since_report += 1
        self.requests += 1
        self.breaker.on_dispatch()

    def release(self) -> None:
        self.in_flight -= 1
        self.breaker.on_release()

    def report_load(
        self,
        waiting: int,
        running: int,
        kv_usage: float,
        at: float | None = None,
        prefix_hit_rate: float | None = None,
        step_s: float | None = None,
        max_num_seqs: int | None = None,
    ) -> None:
        at = time.monotonic() if at is None else at
        self.load = LoadReport(waiting, running, kv_usage, at, prefix_hit_rate, step_s, max_num_seqs)
        self.sent_since_report = 0

    def record_failure(self, kind: str) -> None:
        """A sign the worker is unwell (not the client's fault): counts toward opening its circuit."""
        self.errors[kind] += 1
        self.breaker.on_failure()

    def record_success(self) -> None:
        self.breaker.on_success()

    def mark_unreachable(self) -> None:
        """A connection to it was refused: out of the pool now, not after the next failed health
        checks (back in once one passes)."""
        self.healthy = False

    def describe(self) -> dict[str, Any]:
        load = self.load
        return {
            **self.spec.to_dict(),
            "models": sorted(self.models),
            "healthy": self.healthy,
            "draining": self.draining,
            "circuit": self.breaker.state.name.lower(),
            "in_flight": self.in_flight,
            "remote_in_flight": self.remote_in_flight,
            "requests": self.requests,
            "errors": dict(self.errors),
            "load": None
            if load is None
            else {"waiting": load.waiting, "running": load.running, "kv_usage": load.kv_usage},
        }


class NoWorkerAvailable(LookupError):
    """No worker can take this request now (none serves the model, or all are down, draining or open)."""


class WorkerPool:
    """The router's workers by URL, in the order they were added (policies rely on a stable order)."""

    def __init__(
        self, breaker: BreakerConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._workers: dict[str, Worker] = {}
        self._breaker = breaker or BreakerConfig()
        self._clock = clock  # the circuits' clock (virtual in the simulator)

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, url: str) -> bool:
        return url in self._workers

    def get(self, url: str) -> Worker:
        try:
            return self._workers[url.rstrip("/")]
        except KeyError:
            raise KeyError(f"no worker {url!r}") from None

    def add(self, spec: WorkerSpec) -> Worker:
        if spec.url in self._workers:
            raise ValueError(f"worker {spec.url} is already in the pool")
        worker = Worker(spec, CircuitBreaker(self._breaker, self._clock))
        self._workers[spec.url] = worker
        return worker

    def remove(self, url: str) -> Worker:
        """Take a worker out: no new requests; the ones in flight finish on the `Worker` they hold."""
        worker = self.get(url)
        del self._workers[worker.url]
        return worker

    def models(self) -> list[str]:
        """Every served model, in worker order."""
        seen: dict[str, None] = {}
        for worker in self._workers.values():
            for model in sorted(worker.models):
                seen.setdefault(model, None)
        return list(seen)

    def model_card(self, model: str) -> dict[str, Any]:
        """What a worker's /v1/models says of `model` (the first worker that said anything)."""
        for worker in self._workers.values():
            card = worker.model_cards.get(model)
            if card is not None:
                return card
        return {}

    def default_model(self) -> str | None:
        models = self.models()
        return models[0] if models else None

    def has_models(self) -> bool:
        """Whether any worker has told its models yet (`default_model`, without the list)."""
        return any(worker.models for worker in self._workers.values())

    def serves(self, model: str) -> bool:
        """Whether any worker serves `model` (the per-request check: no list, no sort)."""
        for worker in self._workers.values():  # noqa: SIM110 (a loop: any() over a generator resumes per item)
            if model in worker.models:
                return True
        return False

    def candidates(
        self,
        model: str | None,
        role: Role = Role.BOTH,
        kind: WorkerKind | None = None,
        exclude: Iterable[str] = (),
    ) -> list[Worker]:
        """Available workers that serve `model` in `role`; the excluded ones only if no other is left."""
        fitting = [
            w
            for w in self._workers.values()
            if (model is None or model in w.models)
            and w.role.can(role)
            and (kind is None or w.kind is kind)
            and w.available
        ]
        if exclude and fitting:
            excluded = set(exclude)
            others = [w for w in fitting if w.url not in excluded]
            return others or fitting
        return fitting

    def circuit_states(self) -> dict[str, CircuitState]:
        return {w.url: w.breaker.state for w in self._workers.values()}


class PickedWorker:
    """A worker picked for one request: counted in flight from the pick until `release`.

    The base of the router's `HTTPWorkerHandle` and the simulator's `SimWorkerHandle` (in-process), the two
    `WorkerHandle`s (`worker_handle.py`).
    """

    __slots__ = ("_released", "url", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.url = worker.url
        self._released = False
        worker.acquire()

    @property
    def kind(self) -> WorkerKind:
        return self.worker.kind

    @property
    def role(self) -> Role:
        return self.worker.role

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.worker.spec.labels)

    @property
    def busy(self) -> int:
        """Requests in flight on this worker, as the router counts them (this one included)."""
        return self.worker.in_flight

    def release(self) -> None:
        """This worker's part of the request is done; safe to call more than once."""
        if not self._released:
            self._released = True
            self.worker.release()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url}, {self.kind}, {self.role})"
