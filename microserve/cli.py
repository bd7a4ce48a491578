"""The `microserve` command line: `engine` (and `engine profile`), `router` and `serve`; bench and simulate
join as they land."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from microserve.args import add_connection_args, connection_limits, parse_size
from microserve.bench.cli import add_arguments as add_bench_args
from microserve.http.limits import ConnectionLimits
from microserve.http.tls import add_engine_tls_args, engine_tls
from microserve.machine import resolve_device
from microserve.registry.args import add_register_args, registration_from_args
from microserve.router.config import add_router_args, config_from_args
from microserve.serve import add_serve_args
from microserve.simulator.cli import add_arguments as add_simulate_args

if TYPE_CHECKING:
    from microserve.engine.config import EngineConfig


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="bundled model name, a .gguf file or a Hugging Face folder (default: smollm2-135m)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 where the hardware has native bf16 math, else float32",
    )
    p.add_argument("--device", default="auto", help="auto: cuda if present, else cpu")
    p.add_argument(
        "--quantization",
        default="auto",
        choices=["auto", "none", "int4"],
        help="auto: keep a GGUF's Q4_0/Q4_1 weights packed as int4 when running bfloat16 on CPU, "
        "else none; none: dequantize every weight at load",
    )
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads for this engine")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--backend", default="torch", choices=["torch", "sim"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: --model)")
    p.add_argument("--max-model-len", type=_positive_int, default=None)
    p.add_argument("--block-size", type=_positive_int, default=16)
    p.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        default=parse_size("1GiB"),
        help="KV cache size, e.g. 512MiB (default 1GiB)",
    )
    p.add_argument("--num-kv-blocks", type=_positive_int, default=None, help="KV cache size in blocks")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--max-num-seqs", type=_positive_int, default=64)
    p.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=512,
        help="token budget of one engine step (chunked prefill above it)",
    )
    p.add_argument(
        "--max-waiting", type=_positive_int, default=1024, help="waiting requests beyond this get 503"
    )
    p.add_argument("--sim-profile", default=None, help="cost model JSON for --backend sim")
    p.add_argument(
        "--reservation-ttl",
        type=float,
        default=30.0,
        help="seconds a KV reservation (prep_recv) waits for start_generate before it is freed",
    )
    p.add_argument(
        "--max-reservation-share",
        type=float,
        default=0.5,
        help="share of the KV cache one caller may hold in prep_recv reservations (0.5; at least one "
        "whole context)",
    )
    p.add_argument(
        "--internal-token",
        default=None,
        help="required as 'Authorization: Bearer' on /microserving/*; shows in ps: prefer "
        "--internal-token-file or $MICROSERVE_INTERNAL_TOKEN",
    )
    p.add_argument("--internal-token-file", default=None, help="a file holding the internal token")
    p.add_argument(
        "--metrics-token-file",
        default=None,
        help="/metrics then needs this bearer token (default: $MICROSERVE_METRICS_TOKEN; unset: open)",
    )
    add_register_args(p)
    _add_engine_server_args(p)


def _add_engine_server_args(p: argparse.ArgumentParser) -> None:
    """The engine's HTTP server: the router's connection limits, drain and port hand-over."""
    add_connection_args(p)
    add_engine_tls_args(p)
    p.add_argument(
        "--max-body-size",
        type=parse_size,
        default=None,
        help="largest body of a request with a prompt (default: 1MiB + 16 bytes a token of the context)",
    )
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to drain on stop (30)")
    p.add_argument(
        "--no-reuse-port",
        action="store_true",
        help="listen without SO_REUSEPORT (a second engine on the port fails instead of taking it over)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microserve", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    engine = sub.add_parser("engine", help="run one model engine with an OpenAI-compatible API")
    _add_engine_args(engine)
    engine_sub = engine.add_subparsers(dest="engine_command")
    profile = engine_sub.add_parser("profile", help="measure this machine and write the sim cost model")
    _add_model_args(profile)
    profile.add_argument("--block-size", type=_positive_int, default=16)
    profile.add_argument("--out", default="profile.json", help="where to write the cost model JSON")
    profile.add_argument("--quick", action="store_true", help="fewer points (about 20 s)")

    router = sub.add_parser("router", help="run the router in front of running engines or OpenAI servers")
    router.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    router.add_argument("--port", type=int, default=None, help="port to listen on (default 8000)")
    add_router_args(router)

    serve = sub.add_parser("serve", help="start engines and the router with one command")
    add_serve_args(serve)
    add_router_args(serve, workers=False)

    bench = sub.add_parser("bench", help="load-test any OpenAI-compatible endpoint (vLLM's serving metrics)")
    add_bench_args(bench)

    simulate = sub.add_parser(
        "simulate", help="simulate a fleet on a virtual clock (bench's workloads and report)"
    )
    add_simulate_args(simulate)
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    # Imported here: the engine's modules bring torch, which the router and bench never need.
    from microserve.engine.config import CacheConfig, EngineConfig
    from microserve.engine.scheduler import SchedulerConfig

    return EngineConfig(
        model=args.model,
        backend=args.backend,
        dtype=args.dtype,
        device=resolve_device(args.device),
        quantization=args.quantization,
        threads=args.threads,
        max_model_len=args.max_model_len,
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_kv_blocks,
            memory_bytes=args.kv_cache_memory,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
        ),
        max_waiting=args.max_waiting,
        sim_profile=args.sim_profile,
        served_model_name=args.served_model_name,
        reservation_ttl_s=args.reservation_ttl,
        reservation_share=args.max_reservation_share,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    serves_a_model = args.command == "engine" and args.engine_command != "profile" and args.backend == "torch"
    if argv is None and serves_a_model:  # the program itself, not a caller in Python
        from microserve.engine.host_memory import reexec_with_huge_page_malloc

        reexec_with_huge_page_malloc()  # returns where it does not apply (or already did)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "engine" and args.engine_command == "profile":
            from microserve.runner.profile import run_profile_command

            return run_profile_command(args)
        if args.command == "router":
            from microserve.router.app import run_router

            return run_router(config_from_args(args))
        if args.command == "serve":
            from microserve.serve import run_serve

            return run_serve(args)
        if args.command == "bench":
            from microserve.bench.cli import run as run_bench

            return run_bench(args)
        if args.command == "simulate":
            from microserve.simulator.cli import run as run_simulate

            return run_simulate(args)
        if args.command == "engine":
            from microserve.server.engine_main import run_engine
            from microserve.tokens import (
                INTERNAL_TOKEN_ENV,
                METRICS_TOKEN_ENV,
                require_internal_token,
                resolve_token,
            )

            token = resolve_token(
                "internal-token", args.internal_token, args.internal_token_file, INTERNAL_TOKEN_ENV
            )
            require_internal_token(args.host, token)  # before the model loads: fail in a second
            metrics_token = resolve_token("metrics-token", None, args.metrics_token_file, METRICS_TOKEN_ENV)
            return run_engine(
                engine_config(args),
                host=args.host,
                port=args.port,
                internal_token=token,
                metrics_token=metrics_token,
                register=registration_from_args(args),
                limits=connection_limits(args, ConnectionLimits()),
                max_body_bytes=args.max_body_size,
                drain_timeout_s=args.drain_timeout,
                reuse_port=not args.no_reuse_port,
                tls=engine_tls(args),
            )
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"microserve: error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
