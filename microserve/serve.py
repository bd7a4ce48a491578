"""`microserve serve`: N engines and the router from one command. Engines split the cores, are restarted
with backoff when they crash, and everything stops cleanly (requests drained first) on Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from microserve.http.limits import raise_descriptor_limit
from microserve.local_fleet import LocalFleet
from microserve.router.app import RouterServer, tune_gc
from microserve.router.autoscaler import AutoscalerConfig, PoolAutoscaler
from microserve.router.config import config_from_args
from microserve.router.handoff import HandoffConfig
from microserve.router.router import Router
from microserve.router.workers import Role, WorkerKind, WorkerSpec
from microserve.tokens import INTERNAL_TOKEN_ENV, METRICS_TOKEN_ENV, generate_token
from microserve.tracing import Tracing

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_AFTER_S = 60.0  # an engine that ran this long before crashing restarts without waiting


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def port_is_free(host: str, port: int, *, reuse_port: bool = False) -> bool:
    """Whether a listener could bind `port`; with `reuse_port`, a port held by another reuse-port
    listener of this user (a router being replaced) counts as free."""
    with socket.socket() as s:
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def engine_ports(host: str, start: int, count: int, taken: set[int]) -> list[int]:
    """The first `count` free ports from `start` up."""
    ports: list[int] = []
    port = start
    while len(ports) < count:
        if port > 65535:
            raise OSError(f"no {count} free ports from {start}")
        if port not in taken and port_is_free(host, port):
            ports.append(port)
        port += 1
    return ports


@dataclass(slots=True)
class EngineProcess:
    """One supervised `microserve engine` subprocess."""

    index: int
    port: int
    argv: list[str]
    env: dict[str, str]
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    role: Role = Role.BOTH  # the router's view: PD strategies pick prefill and decode engines by it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(*self.argv, env=self.env)
        self.started_at = time.monotonic()

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.returncode is not None:
                    code = self.proc.returncode
                    raise RuntimeError(f"engine {self.index} exited with {code} while starting")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{self.url}/ready", timeout=aiohttp.ClientTimeout(total=1)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"engine {self.index} on {self.url} not ready after {timeout_s:g} s")

    async def supervise(self) -> None:
        """Restart the engine whenever it exits, until cancelled; the router's health checks notice."""
        while True:
            assert self.proc is not None
            code = await self.proc.wait()
            ran = time.monotonic() - self.started_at
            if ran >= STABLE_AFTER_S:
                self.restarts = 0
            delay = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
            log.warning("engine %d (%s) exited with %s; restart in %g s", self.index, self.url, code, delay)
            await asyncio.sleep(delay)
            self.restarts += 1
            await self.start()

    async def stop(self, timeout_s: float = 20.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            log.warning("engine %d did not stop in %g s; killing it", self.index, timeout_s)
            proc.kill()
            await proc.wait()


def engine_env(internal_token: str | None) -> dict[str, str]:
    """The engines' environment: the internal token travels here, never in argv (`ps` shows argv);
    the metrics token of the router is not theirs."""
    env = {k: v for k, v in os.environ.items() if k not in (INTERNAL_TOKEN_ENV, METRICS_TOKEN_ENV)}
    env["PYTHONUNBUFFERED"] = "1"
    if internal_token:
        env[INTERNAL_TOKEN_ENV] = internal_token
    return env


def engine_argv(args: argparse.Namespace, port: int, threads: int) -> list[str]:
    level = "debug" if args.log_level == "debug" else "warning"  # engines log every request at info
    argv = [sys.executable, "-m", "microserve", "--log-level", level, "engine"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--threads", str(threads)]
    argv += ["--backend", args.backend, "--model", args.model]
    for flag, value in (
        ("--dtype", args.dtype),
        ("--max-model-len", args.max_model_len),
        ("--kv-cache-memory", args.kv_cache_memory),
        ("--sim-profile", args.sim_profile),
    ):
        if value is not None:
            argv += [flag, str(value)]
    for extra in args.engine_arg:
        argv += extra.split()
    return argv


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    host, port = args.host, args.port
    if not port_is_free(host, port, reuse_port=not args.no_reuse_port):
        print(f"microserve serve: port {port} on {host} is taken; pick one with --port", file=sys.stderr)
        return 2
    config = config_from_args(args, host=host, port=port)  # a bad flag fails before engines start
    raise_descriptor_limit()
    plan = pool_plan(args)
    scaling = pool_configs(args, plan)
    roles = [role for role, (count, _, _) in plan.items() for _ in range(count)]
    count = len(roles)
    most = sum(high for _, _, high in plan.values())
    threads = args.threads or max(1, cores() // max(1, most))
    ports = engine_ports("127.0.0.1", args.engine_port or port + 1, count, {port})
    if config.internal_token is None:  # the engines' KV verbs are never open, even on loopback
        config = replace(config, internal_token=generate_token())
    env = engine_env(config.internal_token)
    engines = [
        EngineProcess(i, p, engine_argv(args, p, threads), env, role=r)
        for i, (p, r) in enumerate(zip(ports, roles, strict=True))
    ]
    supervisors: list[asyncio.Task[None]] = []
    server: RouterServer | None = None
    fleet: LocalFleet | None = None
    try:
        each = f"{threads} thread{'s' if threads > 1 else ''} each"
        pools = ", ".join(f"{n} {role}" for role, (n, _, _) in plan.items()) if args.roles else str(count)
        print(f"microserve: starting {pools} {args.backend} engines of {args.model} ({each})")
        await asyncio.gather(*(e.start() for e in engines))
        starting = asyncio.gather(*(e.wait_ready(args.ready_timeout) for e in engines))
        stopped = asyncio.create_task(stop.wait())
        either: list[asyncio.Future[Any]] = [starting, stopped]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            starting.cancel()
            return 130
        stopped.cancel()
        await starting  # raises if an engine died or timed out

        workers = [WorkerSpec(e.url, kind=WorkerKind.MICROSERVE, role=e.role) for e in engines]
        tracing = Tracing.from_env("microserve-router")
        starting_server = RouterServer(Router(replace(config, workers=workers), tracing=tracing))
        await starting_server.start(host, port)  # cleans up after itself if it fails
        server = starting_server
        tune_gc()
        if scaling is not None:
            fleet = start_fleet(args, starting_server.router, PoolAutoscaler(scaling), threads, env, {port})
            for e in engines:
                fleet.adopt(e, e.role)
            engines = []  # the fleet's now
            supervisors = [asyncio.create_task(fleet.run(), name="autoscaler")]
        else:
            supervisors = [asyncio.create_task(e.supervise(), name=f"engine-{e.index}") for e in engines]
        urls = ", ".join(f"{e.url} {e.role}" if args.roles else e.url for e in engines)
        scheme = "https" if config.tls_cert else "http"
        print(f"microserve: serving on {scheme}://{host}:{port}/v1  (engines: {urls})")
        print("microserve: press Ctrl-C to stop", flush=True)
        await stop.wait()
        print("microserve: stopping (finishing requests in flight)…", flush=True)
        return 0
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"microserve serve: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            await server.stop()  # stops listening, drains requests, closes the router
        for task in supervisors:
            task.cancel()
        await asyncio.gather(*supervisors, return_exceptions=True)
        if fleet is not None:
            await fleet.stop()
        await asyncio.gather(*(e.stop() for e in engines))
        print("microserve: stopped", flush=True)


def parse_pools(text: str) -> dict[Role, int]:
    """`--roles`: 'prefill:1,decode:2' (the syntax of `simulate --roles`) -> engines per role, in order."""
    pools: dict[Role, int] = {}
    for part in text.split(","):
        name, sep, count = part.strip().partition(":")
        try:
            role, n = Role(name.strip()), int(count)
        except ValueError:
            raise ValueError(
                f"--roles takes ROLE:COUNT pairs like prefill:1,decode:2, got {part!r}"
            ) from None
        if not sep or n < 0 or role in pools:
            raise ValueError(f"--roles takes each role once with a count >= 0, got {part!r}")
        pools[role] = n
    if Role.BOTH in pools and len(pools) > 1:
        raise ValueError("--roles: 'both' engines do not mix with prefill/decode pools")
    return pools


def parse_scale(text: str) -> tuple[Role, int, int]:
    """`--scale ROLE:MIN:MAX` -> (role, min, max)."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        return Role(parts[0].strip()), int(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"--scale takes ROLE:MIN:MAX like decode:0:2, got {text!r}") from None


def pool_plan(args: argparse.Namespace) -> dict[Role, tuple[int, int, int]]:
    """Per role: (engines to start, fewest, most). Without --roles, one `both` pool of --engines sized by
    --min-engines/--max-engines (today's fleet); with it, each pool starts at its count and stays there
    unless --scale ROLE:MIN:MAX (or --min-engines/--max-engines, applying to each pool) bound it."""
    bounds = dict((r, (lo, hi)) for r, lo, hi in map(parse_scale, args.scale))
    if args.roles is None:
        if set(bounds) - {Role.BOTH}:
            raise ValueError("--scale names a role that --roles does not (the default is both:--engines)")
        low = args.engines if args.min_engines is None else args.min_engines
        high = max(args.engines, low) if args.max_engines is None else args.max_engines
        low, high = bounds.get(Role.BOTH, (low, high))
        _check_bounds(Role.BOTH, low, high)
        return {Role.BOTH: (low, low, high)}
    plan: dict[Role, tuple[int, int, int]] = {}
    pools = parse_pools(args.roles)
    if set(bounds) - set(pools):
        raise ValueError(
            f"--scale names a role --roles does not: {', '.join(sorted(set(bounds) - set(pools)))}"
        )
    for role, count in pools.items():
        low = count if args.min_engines is None else args.min_engines
        high = max(count, low) if args.max_engines is None else args.max_engines
        low, high = bounds.get(role, (low, high))
        _check_bounds(role, low, high)
        plan[role] = (min(max(count, low), high), low, high)
    return plan


def _check_bounds(role: Role, low: int, high: int) -> None:
    if not 0 <= low <= high or high < 1:
        raise ValueError(f"the {role} pool needs 0 <= min <= max and max >= 1, got min {low} max {high}")


def pool_configs(
    args: argparse.Namespace, plan: dict[Role, tuple[int, int, int]]
) -> dict[str, AutoscalerConfig] | None:
    """The autoscaler of each pool, or None for a fixed fleet (every pool at fixed bounds, the default)."""
    fixed = all(low == high == start for start, low, high in plan.values())
    if fixed and args.scale_down_after is None:
        return None
    return {
        str(role): AutoscalerConfig(
            min_replicas=low,
            max_replicas=high,
            target_load=args.scale_target,
            scale_down_after_s=60.0 if args.scale_down_after is None else args.scale_down_after,
            scale_up_cooldown_s=args.scale_up_cooldown,
            ttft_slo_s=args.scale_ttft_slo,
        )
        for role, (_, low, high) in plan.items()
    }


def start_fleet(
    args: argparse.Namespace,
    router: Router,
    scaler: PoolAutoscaler,
    threads: int,
    env: dict[str, str],
    taken: set[int],
) -> LocalFleet:
    first_port = args.engine_port or args.port + 1
    indexes = iter(range(len(router.pool), 1 << 30))

    def make_engine(used: set[int], role: Role) -> EngineProcess:
        port = engine_ports("127.0.0.1", first_port, 1, taken | used)[0]
        return EngineProcess(next(indexes), port, engine_argv(args, port, threads), env, role=role)

    handoff = HandoffConfig(max_tokens=args.handoff_tokens) if args.handoff_tokens > 0 else None
    fleet = LocalFleet(router, scaler, make_engine, ready_timeout_s=args.ready_timeout, handoff=handoff)
    fleet.register_metrics()
    return fleet


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", type=int, default=2, help="engines to start (default 2)")
    p.add_argument("--backend", default="torch", choices=["torch", "sim"])
    p.add_argument("--model", default="smollm2-135m", help="bundled model name, .gguf file or HF folder")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads per engine (cores / engines)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", default=None, help="per engine, e.g. 512MiB")
    p.add_argument("--sim-profile", default=None, help="cost model JSON for --backend sim")
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="'--flag value'",
        help="passed to every engine as is (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1", help="the router's address")
    p.add_argument("--port", type=int, default=8000, help="the router's port (default 8000)")
    p.add_argument("--engine-port", type=int, default=None, help="first engine port (default: --port + 1)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds the engines may take to start")
    p.add_argument(
        "--roles",
        default=None,
        metavar="ROLE:N,...",
        help="engines per role, e.g. prefill:1,decode:2 for a PD --strategy (default both:--engines)",
    )
    scale = p.add_argument_group("autoscaling (default: a fixed fleet of --engines)")
    scale.add_argument(
        "--min-engines",
        type=int,
        default=None,
        help="fewest engines (per pool with --roles); 0 scales to zero",
    )
    scale.add_argument("--max-engines", type=int, default=None, help="most engines (per pool with --roles)")
    scale.add_argument(
        "--scale",
        action="append",
        default=[],
        metavar="ROLE:MIN:MAX",
        help="one pool's bounds, e.g. decode:0:2 (repeatable; overrides --min/--max-engines for it)",
    )
    scale.add_argument(
        "--scale-down-after",
        type=float,
        default=None,
        help="seconds of low load before each engine goes (60)",
    )
    scale.add_argument("--scale-target", type=float, default=8.0, help="requests per engine to aim at (8)")
    scale.add_argument("--scale-up-cooldown", type=float, default=5.0, help="seconds between steps up (5)")
    scale.add_argument(
        "--scale-ttft-slo",
        type=float,
        default=None,
        help="seconds: a TTFT p99 over the last 30 s above it adds an engine and holds scale-down (off)",
    )
    scale.add_argument(
        "--handoff-tokens",
        type=int,
        default=8192,
        help="KV tokens of its hottest prefixes an engine hands to a survivor before it goes (8192; 0: off)",
    )


def run_serve(args: argparse.Namespace) -> int:
    if args.engines < 1:
        print("microserve serve: --engines must be at least 1", file=sys.stderr)
        return 2
    try:
        pool_configs(args, pool_plan(args))
    except ValueError as exc:
        print(f"microserve serve: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        return uvloop.run(serve(args))
    except ImportError:
        return asyncio.run(serve(args))
