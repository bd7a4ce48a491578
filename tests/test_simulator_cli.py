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
        (["--tenant", "quiet"], "NAME:RATE[:PRIORITY]"),
        (["--tenant", "quiet:fast"], "requests/s"),
        (["--tenant", "quiet:1:urgent"], "priority must be one of high, normal, low"),
        (["--tenant", "a:1", "--tenant", "a:2"], "names must differ"),
        (["--tenant", "a:1", "--request-rate", "3"], "does not combine with --request-rate"),
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


def tenant_runs(tmp_path: Path, *extra: str) -> dict[str, dict]:
    """Per tenant, a quiet tenant at half its share beside one sending ten times its share, on one replica
    costed as the bundled model on a 2-core CPU (docs/tenants.md measures the same at length)."""
    out = tmp_path / "sim.json"
    flags = shlex.split(
        "--replicas 1 --profile docs/profiles/smollm2-135m-fp32-2threads.json --max-concurrent 4 "
        "--input-len 40 --output-len 16 --duration 40 --tenant quiet:1.25 --tenant noisy:25"
    )
    assert main(["simulate", *flags, *extra, "--out", str(out)]) == 0
    [run] = orjson.loads(out.read_bytes())["runs"]
    return {row["tenant"]: row for row in run["tenants"]}


def test_tenants_share_the_admission_queue_fairly(tmp_path: Path) -> None:
    fair, fifo = tenant_runs(tmp_path), tenant_runs(tmp_path, "--no-fair-share")
    for runs in (fair, fifo):
        for row in runs.values():
            assert row["sent"] == row["completed"] + row["refused"] and row["failed"] == 0
    # FIFO: the noisy backlog fills the queue and crowds the quiet tenant out; fair share: it is answered,
    # and the noisy tenant's excess is what is refused.
    assert fair["quiet"]["refused"] == 0 and fifo["quiet"]["refused"] > fifo["quiet"]["sent"] / 2
    assert fair["noisy"]["refused"] > fair["noisy"]["sent"] / 2
    assert fair["quiet"]["ttft_ms"]["p99"] < fifo["quiet"]["ttft_ms"]["median"] / 2
