"""`microserve bench` flags: validated up front, each mistake one line and exit 2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from microserve.bench.arrivals import ArrivalKind
from microserve.bench.cli import settings_from_args
from microserve.bench.trace import TraceWorkload
from microserve.bench.workloads import MultiTurnWorkload, RandomWorkload, SharedDocWorkload
from microserve.cli import build_parser, main


def settings(*flags: str):
    return settings_from_args(build_parser().parse_args(["bench", *flags]))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--goodput", "ttft"], "NAME:MILLISECONDS"),
        (["--goodput", "itl:5"], "one of ttft, tpot, e2el"),
        (["--request-rate", "4,0"], "--request-rate must be positive"),
        (["--request-rate", "fast"], "numbers or inf"),
        (["--turns", "3"], "--turns applies to --workload multi-turn, not random"),
        (["--workload", "trace"], "needs --trace FILE"),
        (["--workload", "trace", "--trace", "/nonexistent.jsonl"], "cannot read the trace"),
        (["--burstiness", "0.5", "--arrival", "poisson"], "needs --arrival gamma"),
        (["--workload", "multi-turn", "--endpoint", "completions"], "needs --endpoint chat"),
        (["--prompt-format", "token-ids"], "token-ids needs --endpoint completions"),
        (["--duration", "5"], "inf with --duration needs --max-concurrency"),
        (["--percentiles", "50,101"], "--percentiles"),
        (["--num-requests", "0"], "--num-requests must be positive"),
        (["--input-len", "0"], "input_len must be positive"),
        (["--range-ratio", "1.5"], "range ratio"),
        (["--request-timeout", "0"], "--request-timeout"),
        (["--workload", "trace", "--trace", "t.jsonl", "--output-len", "5"], "each line has its output_len"),
    ],
)
def test_bad_flags_end_in_one_line_and_exit_2(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--base-url", "http://127.0.0.1:1", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--endpoint", "grpc"], "invalid choice"),
        (["--num-requests", "many"], "invalid int value"),
        (["--num-requests", "3", "--duration", "4"], "not allowed with"),
    ],
)
def test_argparse_errors_are_one_line_too(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1


def test_defaults_and_sweep() -> None:
    s = settings("--request-rate", "1,2.5,inf", "--burstiness", "0.5", "--max-concurrency", "8")
    assert [r.request_rate for r in s.runs] == [1.0, 2.5, math.inf]
    assert {(r.kind, r.burstiness, r.max_concurrency, r.num_requests) for r in s.runs} == {
        (ArrivalKind.GAMMA, 0.5, 8, 200)
    }
    assert isinstance(s.workload, RandomWorkload) and s.workload.input_len == 128
    assert s.target.model == "" and s.target.ignore_eos and s.slos == {} and s.percentiles == (90, 99)


def test_workload_flags_reach_their_workload(tmp_path: Path) -> None:
    s = settings("--workload", "multi-turn", "--turns", "5", "--system-prompts", "3", "--output-len", "9")
    assert s.workload == MultiTurnWorkload(turns=5, system_prompts=3, output_len=9)
    s = settings("--workload", "shared-doc", "--documents", "2", "--questions", "7", "--seed", "4")
    assert s.workload == SharedDocWorkload(documents=2, questions=7, output_len=128, seed=4)
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"prompt": "a", "output_len": 2}\n{"prompt": "b", "output_len": 3}\n')
    s = settings("--workload", "trace", "--trace", str(trace), "--no-ignore-eos")
    assert isinstance(s.workload, TraceWorkload) and s.runs[0].num_requests == 2  # one pass by default
    assert not s.target.ignore_eos
    s = settings("--workload", "trace", "--trace", str(trace), "--duration", "3", "--request-rate", "2")
    assert (s.runs[0].num_requests, s.runs[0].duration_s) == (None, 3.0)
