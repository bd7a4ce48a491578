"""`microserve bench` end to end against a real `microserve engine --backend sim` on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import matplotlib.image
import pytest

from microserve.bench.runner import RunConfig, run_benchmark
from microserve.bench.sender import Target
from microserve.bench.workloads import Endpoint, MultiTurnWorkload, RandomWorkload
from microserve.cli import main
from microserve.processes import engine_process

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with engine_process("--backend", "sim", "--max-model-len", "2048") as url:
        yield url


def test_cli_sweep_writes_every_metric_and_valid_plots(
    sim_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, plots = tmp_path / "results.json", tmp_path / "plots"
    argv = ["bench", "--base-url", sim_url, "--num-requests", "20", "--request-rate", "20,inf"]
    argv += ["--input-len", "32", "--output-len", "12", "--goodput", "ttft:60000", "tpot:10000"]
    argv += ["--percentiles", "50,90,99", "--out", str(out), "--plots", str(plots)]
    assert main(argv) == 0

    printed = capsys.readouterr().out
    assert "Request goodput (req/s)" in printed and "Mean TPOT (ms)" in printed

    results = json.loads(out.read_text())
    assert results["model"] == "smollm2-135m"  # asked of the server's /v1/models
    assert [run["request_rate"] for run in results["runs"]] == [20.0, "inf"]
    # Each rate gets fresh prompts: the second run must not be served from the cache the first one warmed.
    assert results["runs"][0]["workload"]["seed"] != results["runs"][1]["workload"]["seed"]
    for run in results["runs"]:
        assert (run["completed"], run["failed"], run["errors"]) == (20, 0, {})
        assert run["total_output_tokens"] == 20 * 12  # ignore_eos: every answer is max_tokens long
        assert run["total_input_tokens"] > 20 * 32  # counted by the server, chat template included
        assert run["request_goodput"] == pytest.approx(run["request_throughput"])  # SLOs nobody misses
        for key in ("request_throughput", "output_throughput", "total_token_throughput", "duration"):
            assert run[key] > 0
        for metric in ("ttft", "tpot", "itl", "e2el"):
            for stat in ("mean", "median", "std", "p50", "p90", "p99"):
                assert isinstance(run[f"{stat}_{metric}_ms"], float), f"{stat}_{metric}_ms"
            assert run[f"mean_{metric}_ms"] > 0
        assert len(run["requests"]["itls"]) == 20 and all(len(g) == 11 for g in run["requests"]["itls"])

    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == ["latency_cdf.png", "latency_vs_rate.png", "throughput_vs_rate.png"]
    for name in pngs:
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC
        height, width, _ = matplotlib.image.imread(plots / name).shape
        assert height > 200 and width > 400


def test_multi_turn_carries_the_engines_answers(sim_url: str) -> None:
    workload = MultiTurnWorkload(turns=3, system_prompts=1, system_prompt_len=40, turn_len=8, output_len=6)
    target = Target(sim_url, "smollm2-135m")
    result = asyncio.run(run_benchmark(target, workload, RunConfig(max_concurrency=4, num_requests=6)))
    by_turn = {(r.request.conversation, r.request.turn): r for r in result.records}
    assert sorted(by_turn) == [(c, t) for c in (0, 1) for t in range(3)]
    for (conv, turn), r in by_turn.items():
        assert r.success and r.output_tokens == 6 and r.text
        if turn:
            previous = by_turn[(conv, turn - 1)]
            assert r.request.messages[-2] == {"role": "assistant", "content": previous.text}  # type: ignore[index]
            assert r.prompt_len > previous.prompt_len + previous.output_tokens  # the history grew


def test_token_id_prompts_over_completions_have_exact_input_lengths(sim_url: str) -> None:
    workload = RandomWorkload(input_len=50, output_len=4, token_ids=True, seed=5)
    target = Target(sim_url, "smollm2-135m", endpoint=Endpoint.COMPLETIONS)
    result = asyncio.run(run_benchmark(target, workload, RunConfig(request_rate=50.0, num_requests=5)))
    assert [(r.prompt_len, r.output_tokens) for r in result.records] == [(50, 4)] * 5


def test_failures_are_reported_with_their_error(sim_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "bench",
        "--base-url",
        sim_url,
        "--model",
        "no-such-model",
        "--num-requests",
        "3",
        "--no-progress",
    ]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "3x HTTP 404" in captured.out and "completed no request" in captured.err
