"""The load a worker reports on its Prometheus metrics (vLLM's and SGLang's names)."""

from __future__ import annotations

from microserve.router.health import parse_prometheus_load


def test_prometheus_load_from_vllm_and_sglang() -> None:
    vllm = (
        "# HELP vllm:num_requests_waiting x\n"
        'vllm:num_requests_waiting{model_name="a"} 3.0\n'
        'vllm:num_requests_waiting{model_name="b"} 1.0\n'
        'vllm:num_requests_running{model_name="a"} 2.0\n'
        'vllm:gpu_cache_usage_perc{model_name="a"} 0.25\n'
    )
    assert parse_prometheus_load(vllm) == (4, 2, 0.25)
    assert parse_prometheus_load("sglang:num_queue_reqs 5\nsglang:token_usage 0.5\n") == (5, 0, 0.5)
    assert parse_prometheus_load("process_cpu_seconds_total 3\n") is None
