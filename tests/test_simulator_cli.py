"""`microserve simulate` end to end in-process: flags in, bench's table, JSON and plots out."""

from __future__ import annotations

import shlex
from pathlib import Path

import orjson
import pytest

from microserve.cli import main


def test_a_small_simulation_writes_bench_shaped_json_and_plots(tmp_path: Path, capsys) -> None:
    out, plots = tmp_path / "sim.json", tmp_path / "plots"
    flags = shlex.split(
        "--roles prefill:1,decode:2 --strategy pd_balanced --policy least_loaded --num-kv-blocks 1024 "
        "--max-model-len 4096 --transfer-bandwidth 10GiB --endpoint completions --prompt-format token-ids "
        "--input-len 128 --output-len 8 --request-rate 4,inf --num-requests 20 --goodput ttft:500"
    )
    extra = ["--strategy-options", '{"ratio": 0.25}', "--out", str(out), "--plots", str(plots)]
    code = main(["simulate", *flags, *extra])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Mean TTFT (ms)" in printed and "rate inf" in printed
    data = orjson.loads(out.read_bytes())
    assert data["simulated"] is True
    assert data["fleet"]["roles"] == {"prefill": 1, "decode": 2}
    assert data["fleet"]["strategy"] == {"name": "pd_balanced", "options": {"ratio": 0.25}}
    assert data["fleet"]["transfer_bandwidth_bytes_per_s"] == 10 * 2**30
    assert [run["request_rate"] for run in data["runs"]] == [4.0, "inf"]
    for run in data["runs"]:
        assert run["completed"] == 20 and run["failed"] == 0
        assert run["mean_ttft_ms"] > 0 and run["p99_e2el_ms"] >= run["median_e2el_ms"]
        assert run["request_goodput"] is not None
        assert len(run["requests"]["ttfts"]) == 20
        assert [r["role"] for r in run["replicas"]] == ["prefill", "decode", "decode"]
        assert all(r["left_in_engine"] == 0 for r in run["replicas"])
    assert sorted(p.name for p in plots.iterdir()) == [
        "latency_cdf.png",
        "latency_vs_rate.png",
        "throughput_vs_rate.png",
    ]


def simulate(*flags: str) -> int | str | None:
    """The exit code, whether `main` returns it or argparse exits with it."""
    try:
        return main(["simulate", *flags])
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--roles", "prefill:2,decode:2", "--replicas", "3"], "names 4 replicas"),
        (["--strategy", "nope"], "unknown strategy"),
        (["--policy", "nope"], "unknown policy"),
        (["--num-kv-blocks", "10"], "less than one request"),
        (["--strategy-options", "[1]"], "expected a JSON object"),
    ],
)
def test_bad_flags_fail_in_one_line_with_exit_2(flags: list[str], message: str, capsys) -> None:
    assert simulate(*flags, "--num-requests", "1") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_simulate_runs_the_routers_admission_and_deadlines(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    flags = shlex.split(
        "--replicas 2 --num-kv-blocks 1024 --max-model-len 4096 --max-num-seqs 8 --endpoint completions "
        "--prompt-format token-ids --input-len 64 --output-len 32 --request-rate 200 --num-requests 200 "
        "--admission --max-queue-wait 1 --deadlines"
    )
    assert main(["simulate", *flags, "--out", str(out)]) == 0
    [run] = orjson.loads(out.read_bytes())["runs"]
    # Far over what two replicas of 8 serve: most are refused at once, the admitted start within budget.
    assert run["failed"] > run["completed"] > 0
    assert max(t for t in run["requests"]["ttfts"] if t is not None) < 1.0 + 1.0
