"""The `microserve bench` command: flags in, one validated `BenchSettings`, runs, report out.

Thin on purpose: the load, the metrics and the report live in their own modules and are tested there."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import aiohttp
from rich.console import Console
from rich.markup import escape

from microserve.bench.arrivals import ArrivalKind
from microserve.bench.metrics import DEFAULT_PERCENTILES, parse_goodput, parse_percentiles, summarize
from microserve.bench.runner import LiveProgress, RunConfig, run_benchmark, sweep_configs
from microserve.bench.sender import Target, first_model
from microserve.bench.trace import TraceWorkload
from microserve.bench.workloads import (
    Endpoint,
    MultiTurnWorkload,
    RandomWorkload,
    SharedDocWorkload,
    Workload,
)

if TYPE_CHECKING:
    from microserve.bench.report import RunReport

DEFAULT_NUM_REQUESTS = 200

# Workload flags, which workload each belongs to, and its default when that workload runs.
_WORKLOAD_FLAGS: dict[str, tuple[str, Any]] = {
    "input_len": ("random", 128),
    "range_ratio": ("random", 0.0),
    "prompt_format": ("random", "text"),
    "turns": ("multi-turn", 4),
    "system_prompts": ("multi-turn", 2),
    "system_prompt_len": ("multi-turn", 256),
    "turn_len": ("multi-turn", 32),
    "documents": ("shared-doc", 4),
    "document_len": ("shared-doc", 1024),
    "questions": ("shared-doc", 4),
    "question_len": ("shared-doc", 16),
    "trace": ("trace", None),
}


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Bad flags end in one line and exit 2, without argparse's usage block."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"microserve bench: error: {message}\n")

    parser.error = error  # type: ignore[method-assign]


def add_arguments(p: argparse.ArgumentParser) -> None:
    _one_line_errors(p)
    target = p.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000", help="OpenAI-compatible server")
    target.add_argument("--model", default=None, help="model id (default: the first at /v1/models)")
    target.add_argument("--endpoint", choices=[e.value for e in Endpoint], default=Endpoint.CHAT.value)
    target.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY"
    )
    target.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send vLLM's ignore_eos (for servers that reject it; answers may then end early)",
    )
    target.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")

    load = p.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        default="inf",
        help="requests/s, or inf for all at once; a comma list (1,2,4,inf) sweeps the rates in turn",
    )
    load.add_argument("--arrival", choices=[k.value for k in ArrivalKind], default=None)
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape: <1 burstier, >1 smoother than Poisson (needs --arrival gamma, its default then)",
    )
    load.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    end = load.add_mutually_exclusive_group()
    end.add_argument("--num-requests", type=int, default=None, help=f"default {DEFAULT_NUM_REQUESTS}")
    end.add_argument("--duration", type=float, default=None, help="seconds to keep issuing requests")
    load.add_argument("--seed", type=int, default=0)

    work = p.add_argument_group("workload")
    work.add_argument("--workload", choices=["random", "multi-turn", "shared-doc", "trace"], default="random")
    work.add_argument("--output-len", type=int, help="tokens per answer; default 128 (a trace has its own)")
    work.add_argument("--input-len", type=int, help="random: prompt words (or token ids); default 128")
    work.add_argument("--range-ratio", type=float, help="random: lengths uniform in len*(1±r); default 0")
    work.add_argument(
        "--prompt-format",
        choices=["text", "token-ids"],
        help="random: token-ids needs --endpoint completions",
    )
    work.add_argument("--turns", type=int, help="multi-turn: turns per conversation; default 4")
    work.add_argument("--system-prompts", type=int, help="multi-turn: shared system prompts; default 2")
    work.add_argument("--system-prompt-len", type=int, help="multi-turn: words; default 256")
    work.add_argument("--turn-len", type=int, help="multi-turn: words per user turn; default 32")
    work.add_argument("--documents", type=int, help="shared-doc: documents; default 4")
    work.add_argument("--document-len", type=int, help="shared-doc: words per document; default 1024")
    work.add_argument("--questions", type=int, help="shared-doc: questions per document; default 4")
    work.add_argument("--question-len", type=int, help="shared-doc: words per question; default 16")
    work.add_argument("--trace", help='JSONL, one {"prompt"|"messages": ..., "output_len": n} a line')

    out = p.add_argument_group("report")
    out.add_argument(
        "--goodput", nargs="+", default=[], metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50"
    )
    out.add_argument("--percentiles", default=",".join(f"{q:g}" for q in DEFAULT_PERCENTILES))
    out.add_argument("--out", default=None, help="results JSON path")
    out.add_argument("--plots", default=None, help="directory for PNG plots")
    out.add_argument("--no-progress", action="store_true", help="no live progress bar")


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """Everything a bench invocation does, validated."""

    target: Target  # model "" until resolved from the server
    workload: Workload
    runs: tuple[RunConfig, ...]
    percentiles: tuple[float, ...]
    slos: dict[str, float]
    out: Path | None
    plots: Path | None
    progress: bool


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"--request-rate takes numbers or inf, got {part!r}") from None
        if not rate > 0:
            raise ValueError(f"--request-rate must be positive, got {part!r}")
        rates.append(rate)
    return rates


def workload_from_args(args: argparse.Namespace) -> Workload:
    given = {k: getattr(args, k) for k in _WORKLOAD_FLAGS if getattr(args, k) is not None}
    for key in given:
        owner = _WORKLOAD_FLAGS[key][0]
        if owner != args.workload:
            raise ValueError(f"--{key.replace('_', '-')} applies to --workload {owner}, not {args.workload}")
    v = {
        k: given.get(k, default) for k, (owner, default) in _WORKLOAD_FLAGS.items() if owner == args.workload
    }
    if args.workload == "trace" and args.output_len is not None:
        raise ValueError("--output-len does not apply to --workload trace: each line has its output_len")
    common = {"output_len": 128 if args.output_len is None else args.output_len, "seed": args.seed}
    if args.workload == "random":
        token_ids = v.pop("prompt_format") == "token-ids"
        return RandomWorkload(**v, token_ids=token_ids, **common)
    if args.workload == "multi-turn":
        return MultiTurnWorkload(**v, **common)
    if args.workload == "shared-doc":
        return SharedDocWorkload(**v, **common)
    if v["trace"] is None:
        raise ValueError("--workload trace needs --trace FILE")
    return TraceWorkload.load(v["trace"])


def run_configs(args: argparse.Namespace, workload: Workload) -> tuple[RunConfig, ...]:
    """One run per --request-rate (a sweep); bench and simulate share the arrival and count flags."""
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = workload.natural_count or DEFAULT_NUM_REQUESTS
    rates = parse_rates(args.request_rate)
    base = RunConfig(
        request_rate=rates[0],
        burstiness=args.burstiness,
        arrival=ArrivalKind(args.arrival) if args.arrival else None,
        max_concurrency=args.max_concurrency,
        num_requests=num_requests,
        duration_s=args.duration,
        seed=args.seed,
    )
    return tuple(sweep_configs(base, rates))


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Validate every flag up front: a mistake costs one line, not a half-run benchmark."""
    endpoint = Endpoint(args.endpoint)
    workload = workload_from_args(args)
    workload.check_endpoint(endpoint)
    if args.request_timeout <= 0:
        raise ValueError(f"--request-timeout must be positive, got {args.request_timeout}")
    runs = run_configs(args, workload)
    target = Target(
        base_url=args.base_url,
        model=args.model or "",
        endpoint=endpoint,
        ignore_eos=not args.no_ignore_eos,
        api_key=args.api_key,
        request_timeout_s=args.request_timeout,
    )
    return BenchSettings(
        target=target,
        workload=workload,
        runs=runs,
        percentiles=parse_percentiles(args.percentiles),
        slos=parse_goodput(args.goodput),
        out=Path(args.out) if args.out else None,
        plots=Path(args.plots) if args.plots else None,
        progress=not args.no_progress,
    )


async def bench(settings: BenchSettings) -> tuple[Target, list[RunReport]]:
    """Resolve the model if needed, then run each configured rate in turn."""
    from microserve.bench.report import RunReport

    target = settings.target
    if not target.model:
        async with aiohttp.ClientSession() as session:
            target = replace(target, model=await first_model(session, target.base_url, target.api_key))
    reports = []
    for run, config in enumerate(settings.runs):
        workload = settings.workload.for_run(run)
        label = f"rate {'inf' if math.isinf(config.request_rate) else f'{config.request_rate:g}'}"
        if settings.progress:
            with LiveProgress(label, config, console=Console(stderr=True)) as progress:
                result = await run_benchmark(target, workload, config, progress)
        else:
            result = await run_benchmark(target, workload, config)
        summary = summarize(
            result.records, result.duration_s, settings.percentiles, settings.slos, result.skipped
        )
        reports.append(RunReport(result, summary))
    return target, reports


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    """`microserve bench`: 0 when every run completed at least one request, 1 when a run had none."""
    # The report imports matplotlib (0.4 s): only a bench run pays for it, not every microserve command.
    from microserve.bench.report import error_lines, results_dict, summary_table, write_json, write_plots

    settings = settings_from_args(args)
    console = console or Console()
    target, reports = asyncio.run(bench(settings))
    console.print(summary_table(reports, title=f"microserve bench: {settings.workload.name}"))
    for line in error_lines(reports):
        console.print(f"[red]error[/red] {escape(line)}", highlight=False)
    if settings.out:
        meta = {
            "base_url": target.base_url,
            "model": target.model,
            "endpoint": target.endpoint.value,
            "ignore_eos": target.ignore_eos,
            "workload": settings.workload.describe(),
            "percentiles": list(settings.percentiles),
        }
        write_json(settings.out, results_dict(reports, meta))
        console.print(f"results: {settings.out}", highlight=False)
    if settings.plots:
        for path in write_plots(reports, settings.plots):
            console.print(f"plot: {path}", highlight=False)
    if any(r.summary.completed == 0 for r in reports):
        print("microserve bench: error: a run completed no request (see the errors above)", file=sys.stderr)
        return 1
    return 0
