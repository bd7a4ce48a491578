"""The router's configuration: one dataclass, filled from a YAML file and then from command-line flags
(flags win). `add_router_args` declares the flags that `microserve router` and `microserve serve` share."""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import orjson

from microserve.args import add_connection_args, connection_limits, parse_size
from microserve.http.limits import ConnectionLimits, MiB
from microserve.http.tls import client_context
from microserve.router.admission import AdmissionConfig
from microserve.router.breaker import BreakerConfig
from microserve.router.deadlines import DeadlineConfig
from microserve.router.discovery import make_discovery
from microserve.router.health import HealthConfig
from microserve.router.kube_scaler import check_scale_targets
from microserve.router.retry import RetryConfig
from microserve.router.workers import WorkerSpec
from microserve.tenants.semantic import DEFAULT_THRESHOLD
from microserve.tokens import ADMIN_TOKEN_ENV, INTERNAL_TOKEN_ENV, METRICS_TOKEN_ENV, resolve_token


@dataclass(slots=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: list[WorkerSpec] = field(default_factory=list)
    discovery: list[str] = field(default_factory=list)  # etcd://HOST:PORT[/prefix], file:///path
    k8s_scale: list[str] = field(default_factory=list)  # k8s://NAMESPACE/DEPLOYMENT?…: Deployments sized
    strategy: str = "data_parallel"  # a built-in name or path/to/file.py:ClassName
    strategy_options: dict[str, Any] = field(default_factory=dict)
    policy: str = "round_robin"
    policy_options: dict[str, Any] = field(default_factory=dict)
    admin_token: str | None = None  # None: the admin API answers 403
    internal_token: str | None = None  # sent to microserve engines as `Authorization: Bearer`
    metrics_token: str | None = None  # None: /metrics and /prometheus/targets are open
    request_timeout_s: float = 600.0  # one deadline per request: queueing, retries and the answer
    connect_timeout_s: float = 5.0
    max_connections: int = 4096  # the shared connection pool to all workers
    drain_timeout_s: float = 30.0  # on shutdown, how long requests in flight may take to finish
    # The OpenAI routes' body limit: a 256K-token context at 16 bytes a token (JSON-escaped non-ASCII
    # text, or token ids); other routes take the connection limits' much smaller default.
    max_body_bytes: int = 4 * MiB
    reuse_port: bool = True  # a new router may listen on this port while this one drains (a hand-over)
    stream_continuation: bool = True  # track microserve streams to continue them if an engine dies
    max_continuations: int = 3
    tokenizers: dict[str, str] = field(default_factory=dict)  # served model -> tokenizer source
    retry: RetryConfig = field(default_factory=RetryConfig)
    circuit_breaker: BreakerConfig = field(default_factory=BreakerConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    deadlines: DeadlineConfig = field(default_factory=DeadlineConfig)  # first byte and stalls per attempt
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)  # the clients' connections
    api_keys: str | None = None  # a keys file or redis://…: every /v1 request then needs a key
    fair_share: bool = True  # within a priority class, tenants share the admission queue fairly
    tls_cert: str | None = None  # with tls_key: the router serves HTTPS
    tls_key: str | None = None
    response_cache: str | None = None  # memory or redis://…: deterministic answers served again
    response_cache_ttl_s: float = 3600.0
    response_cache_bytes: int = 256 * MiB  # the memory cache's bound (Redis: the server's maxmemory)
    shared_state: str | None = None  # redis://…: prefix index, loads and circuits shared by replicas
    worker_tls_ca: str | None = None  # https:// workers: verified against this CA
    worker_tls_cert: str | None = None  # with worker_tls_key: presented to workers (mutual TLS)
    worker_tls_key: str | None = None
    # A cosine threshold: reuse the answer to a question that means the same (needs response_cache).
    semantic_cache: float | None = None
    semantic_cache_model: str | None = None  # embed with this served model (default: the request's)

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0 or self.connect_timeout_s <= 0 or self.drain_timeout_s < 0:
            raise ValueError("timeouts must be positive")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be at least 1")
        if self.max_connections < 1 or self.max_continuations < 0:
            raise ValueError("need max_connections >= 1 and max_continuations >= 0")
        if self.response_cache is not None and not (
            self.response_cache == "memory"
            or self.response_cache.startswith(("redis://", "rediss://", "unix://"))
        ):
            raise ValueError(f"--response-cache takes memory or redis://…, not {self.response_cache!r}")
        if self.shared_state is not None and not self.shared_state.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(f"--shared-state takes redis://HOST:PORT[/db], not {self.shared_state!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if (self.worker_tls_cert is None) != (self.worker_tls_key is None):
            raise ValueError("--worker-tls-cert and --worker-tls-key go together")
        if self.semantic_cache is not None:
            if self.response_cache is None:
                raise ValueError("--semantic-cache needs --response-cache (the answers are kept there)")
            if not 0.0 < self.semantic_cache <= 1.0:
                raise ValueError(
                    f"--semantic-cache takes a cosine threshold in (0, 1], not {self.semantic_cache}"
                )
        if self.response_cache_ttl_s <= 0 or self.response_cache_bytes < 1:
            raise ValueError("the response cache needs a positive TTL and size")
        if isinstance(self.discovery, str):
            self.discovery = [self.discovery]
        for url in self.discovery:
            make_discovery(url)  # a bad URL fails here, before anything starts
        if isinstance(self.k8s_scale, str):
            self.k8s_scale = [self.k8s_scale]
        check_scale_targets(self.k8s_scale)

    def worker_tls(self) -> ssl.SSLContext | None:
        """The client context for https:// workers; None: the system's CAs, no client certificate."""
        if self.worker_tls_ca is None and self.worker_tls_cert is None:
            return None
        return client_context(self.worker_tls_ca, self.worker_tls_cert, self.worker_tls_key)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterConfig:
        """From the YAML document's shape; `strategy` and `policy` may be a name or {name, options}."""
        if not isinstance(d, dict):
            raise ValueError("the router configuration must be a mapping")
        d = dict(d)
        sections = {
            "retry": RetryConfig,
            "circuit_breaker": BreakerConfig,
            "health": HealthConfig,
            "admission": AdmissionConfig,
            "deadlines": DeadlineConfig,
            "connections": ConnectionLimits,
        }
        kwargs: dict[str, Any] = {}
        for name, section in sections.items():
            if name in d:
                kwargs[name] = _section(section, d.pop(name), name)
        for name in ("strategy", "policy"):
            value = d.pop(name, None)
            if isinstance(value, dict):
                kwargs[name] = value.get("name")
                kwargs[f"{name}_options"] = dict(value.get("options") or {})
            elif value is not None:
                kwargs[name] = value
        kwargs["workers"] = [WorkerSpec.from_dict(w) for w in d.pop("workers", None) or []]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown router setting(s): {', '.join(unknown)}")
        return cls(**d, **kwargs)


def _section(cls: type, value: Any, name: str) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping")
    try:
        return cls(**value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: {exc}") from None


def load_config_file(path: str | Path) -> RouterConfig:
    import yaml  # only a router started with --config needs it

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    try:
        return RouterConfig.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def parse_option(text: str) -> tuple[str, Any]:
    """`key=value`; the value is read as JSON when it parses (numbers, booleans, lists), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return key, raw


def _worker(text: str) -> WorkerSpec:
    try:
        return WorkerSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_router_args(p: argparse.ArgumentParser, *, workers: bool = True) -> None:
    """Router flags; a flag left out keeps the config file's value (or the default)."""
    p.add_argument("--config", default=None, help="router YAML file (flags override it)")
    if workers:
        p.add_argument(
            "--worker",
            action="append",
            type=_worker,
            default=[],
            metavar="URL[,key=value…]",
            help="a worker: URL plus kind=microserve|openai, role=prefill|decode|both, weight=N, "
            "model=NAME (repeatable), label.KEY=VALUE, api_key=KEY (repeatable flag)",
        )
    p.add_argument(
        "--discovery",
        action="append",
        default=[],
        metavar="URL",
        help="follow workers registered in etcd://HOST:PORT[/prefix] or listed in file:///path.yaml "
        "(repeatable; docs/discovery.md)",
    )
    p.add_argument(
        "--k8s-scale",
        action="append",
        default=[],
        metavar="URL",
        help="autoscale a Deployment: k8s://NAMESPACE/DEPLOYMENT?role=both&min=1&max=N "
        "(one per role; docs/kubernetes.md)",
    )
    p.add_argument("--strategy", default=None, help="data_parallel (default) or path/to/file.py:ClassName")
    p.add_argument("--strategy-opt", action="append", type=parse_option, default=[], metavar="KEY=VALUE")
    p.add_argument("--policy", default=None, help="round_robin (default), least_connections, …")
    p.add_argument("--policy-opt", action="append", type=parse_option, default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--admin-token",
        default=None,
        help=f"bearer token of the admin API (default: ${ADMIN_TOKEN_ENV}; unset: admin API off); "
        "shows in ps: prefer --admin-token-file",
    )
    p.add_argument("--admin-token-file", default=None, help="a file holding the admin token")
    p.add_argument(
        "--internal-token",
        default=None,
        help=f"bearer token the router sends to microserve engines (default: ${INTERNAL_TOKEN_ENV}); "
        "shows in ps: prefer --internal-token-file",
    )
    p.add_argument("--internal-token-file", default=None, help="a file holding the internal token")
    p.add_argument(
        "--metrics-token-file",
        default=None,
        help=f"/metrics and /prometheus/targets then need this bearer token (default: ${METRICS_TOKEN_ENV}; "
        "unset: open)",
    )
    p.add_argument("--request-timeout", type=float, default=None, help="seconds per request (600)")
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="requests running at once (default: the sum of the ready engines' batch sizes)",
    )
    p.add_argument("--max-queued", type=int, default=None, help="requests waiting beyond those (1024)")
    p.add_argument(
        "--max-queue-wait",
        type=float,
        default=None,
        help="seconds a request may expect to wait for a slot; beyond it, 429 at once (2)",
    )
    p.add_argument(
        "--queue-timeout",
        type=float,
        default=None,
        help="seconds a request is held while no worker is ready, then 503 (30)",
    )
    p.add_argument(
        "--first-byte-timeout",
        type=float,
        default=None,
        help="least seconds an attempt waits for a stream's first byte (5; longer on slow engines)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=None,
        help="least seconds between two chunks of a stream before the attempt fails (2; more if slow)",
    )
    p.add_argument("--max-attempts", type=int, default=None, help="attempts per request, first included (3)")
    p.add_argument("--health-interval", type=float, default=None, help="seconds between health checks (2)")
    p.add_argument(
        "--max-body-size", type=parse_size, default=None, help="largest body of an OpenAI request (4MiB)"
    )
    add_connection_args(p)
    p.add_argument(
        "--api-keys",
        default=None,
        metavar="PATH|redis://…",
        help="require API keys on /v1 (keys and limits in a JSON file, or in Redis shared by replicas)",
    )
    p.add_argument(
        "--no-fair-share",
        action="store_true",
        help="admit waiting requests in arrival order within a priority class, whatever their tenant",
    )
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="serve HTTPS with this certificate chain")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    p.add_argument(
        "--response-cache",
        default=None,
        metavar="memory|redis://…",
        help="answer repeated deterministic requests (temperature 0 or a seed) from a cache (default off)",
    )
    p.add_argument(
        "--response-cache-ttl", type=float, default=None, help="seconds a cached answer lives (3600)"
    )
    p.add_argument(
        "--response-cache-size", type=parse_size, default=None, help="the memory cache's bound (256MiB)"
    )
    p.add_argument(
        "--shared-state",
        default=None,
        metavar="redis://HOST:PORT[/db]",
        help="share the prefix index, loads and circuits with other router replicas through Redis",
    )
    p.add_argument(
        "--worker-tls-ca", default=None, metavar="PEM", help="verify https:// workers against this CA"
    )
    p.add_argument(
        "--worker-tls-cert",
        default=None,
        metavar="PEM",
        help="present this certificate to workers (engines started with --tls-client-ca require one)",
    )
    p.add_argument(
        "--worker-tls-key", default=None, metavar="PEM", help="the private key of --worker-tls-cert"
    )
    p.add_argument(
        "--semantic-cache",
        type=float,
        nargs="?",
        const=DEFAULT_THRESHOLD,
        default=None,
        metavar="THRESHOLD",
        help="also reuse the answer to a question that means the same (cosine of the fleet's embeddings at "
        f"or above THRESHOLD, default {DEFAULT_THRESHOLD}); needs --response-cache",
    )
    p.add_argument(
        "--semantic-cache-model",
        default=None,
        metavar="MODEL",
        help="the served model whose /v1/embeddings the semantic cache uses (default: the request's model)",
    )
    p.add_argument("--drain-timeout", type=float, default=None, help="seconds to drain on stop (30)")
    p.add_argument(
        "--no-reuse-port",
        action="store_true",
        help="listen without SO_REUSEPORT (a second router on the port fails instead of taking it over)",
    )
    p.add_argument(
        "--no-stream-continuation",
        action="store_true",
        help="do not track engine streams (no continuation when an engine dies mid-stream)",
    )
    p.add_argument(
        "--tokenizer",
        action="append",
        type=parse_option,
        default=[],
        metavar="MODEL=SOURCE",
        help="where the router finds a served model's tokenizer (default: the model name itself)",
    )


# (flag's dest, setting): a repeatable flag adds to the list; a plain flag replaces; a switch turns off.
_LIST_FLAGS = (("worker", "workers"), ("discovery", "discovery"), ("k8s_scale", "k8s_scale"))
_PLAIN_FLAGS = (
    ("request_timeout", "request_timeout_s"),
    ("max_body_size", "max_body_bytes"),
    ("drain_timeout", "drain_timeout_s"),
    ("api_keys", "api_keys"),
    ("tls_cert", "tls_cert"),
    ("tls_key", "tls_key"),
    ("response_cache", "response_cache"),
    ("response_cache_ttl", "response_cache_ttl_s"),
    ("response_cache_size", "response_cache_bytes"),
    ("shared_state", "shared_state"),
    ("worker_tls_ca", "worker_tls_ca"),
    ("worker_tls_cert", "worker_tls_cert"),
    ("worker_tls_key", "worker_tls_key"),
    ("semantic_cache", "semantic_cache"),
    ("semantic_cache_model", "semantic_cache_model"),
    ("host", "host"),
    ("port", "port"),
)
_OFF_SWITCHES = (
    ("no_stream_continuation", "stream_continuation"),
    ("no_fair_share", "fair_share"),
    ("no_reuse_port", "reuse_port"),
)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> RouterConfig:
    """The config file (if any), then the flags that were given, then `overrides`."""
    config = load_config_file(args.config) if args.config else RouterConfig()
    changes: dict[str, Any] = {}
    for flag, name in _LIST_FLAGS:  # a repeatable flag adds to the file's list
        if getattr(args, flag, None):
            changes[name] = [*getattr(config, name), *getattr(args, flag)]
    for name in ("strategy", "policy"):  # a name starts from no options; --*-opt adds to them
        options = f"{name}_options"
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
            changes[options] = {}
        if getattr(args, f"{name}_opt"):
            changes[options] = {
                **changes.get(options, getattr(config, options)),
                **dict(getattr(args, f"{name}_opt")),
            }
    for name, env in (
        ("admin_token", ADMIN_TOKEN_ENV),
        ("internal_token", INTERNAL_TOKEN_ENV),
        ("metrics_token", METRICS_TOKEN_ENV),
    ):
        flag = name.replace("_", "-")
        token = resolve_token(flag, getattr(args, name, None), getattr(args, f"{name}_file"), env)
        if token is not None:
            changes[name] = token
    for flag, name in _PLAIN_FLAGS:  # a flag given replaces the setting
        if getattr(args, flag, None) is not None:
            changes[name] = getattr(args, flag)
    for flag, name in _OFF_SWITCHES:
        if getattr(args, flag, False):
            changes[name] = False
    admission_flags = (args.max_concurrent, args.max_queued, args.max_queue_wait, args.queue_timeout)
    if any(flag is not None for flag in admission_flags):
        admission = config.admission
        changes["admission"] = replace(
            admission,
            max_concurrent=args.max_concurrent or admission.max_concurrent,
            max_queued=admission.max_queued if args.max_queued is None else args.max_queued,
            max_queue_wait_s=admission.max_queue_wait_s
            if args.max_queue_wait is None
            else args.max_queue_wait,
            queue_timeout_s=args.queue_timeout or admission.queue_timeout_s,
        )
    if args.first_byte_timeout is not None or args.stall_timeout is not None:
        d = config.deadlines
        changes["deadlines"] = replace(
            d,
            first_byte_floor_s=args.first_byte_timeout or d.first_byte_floor_s,
            stall_floor_s=args.stall_timeout or d.stall_floor_s,
        )
    if args.max_attempts is not None:
        changes["retry"] = replace(config.retry, max_attempts=args.max_attempts)
    if args.health_interval is not None:
        changes["health"] = replace(config.health, interval_s=args.health_interval)
    limits = connection_limits(args, config.connections)
    if limits is not config.connections:
        changes["connections"] = limits
    if args.tokenizer:
        changes["tokenizers"] = {**config.tokenizers, **{k: str(v) for k, v in args.tokenizer}}
    return replace(config, **{**changes, **overrides})
