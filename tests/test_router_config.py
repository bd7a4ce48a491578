"""The router's config: a YAML file, then flags over it, and what each refuses."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from microserve.router.config import RouterConfig, add_router_args, config_from_args, load_config_file


def test_yaml_config_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "port: 9000\n"
        "policy: {name: prefix_aware, options: {min_match: 64}}\n"
        "retry: {max_attempts: 5}\n"
        "workers:\n"
        "  - {url: 'http://a:1', weight: 3, labels: {zone: x}}\n"
        "  - {url: 'http://b:1', kind: openai, models: [llama]}\n"
    )
    config = load_config_file(path)
    assert (config.port, config.policy, config.policy_options) == (9000, "prefix_aware", {"min_match": 64})
    assert config.retry.max_attempts == 5 and [w.weight for w in config.workers] == [3, 1]

    parser = argparse.ArgumentParser()
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    add_router_args(parser)
    args = parser.parse_args(
        [
            "--config",
            str(path),
            "--worker",
            "http://c:1",
            "--policy-opt",
            "balance_abs=8",
            "--max-queued",
            "0",
        ]
    )
    config = config_from_args(args)
    assert [w.url for w in config.workers] == ["http://a:1", "http://b:1", "http://c:1"]
    assert config.policy_options == {"min_match": 64, "balance_abs": 8}
    assert config.admission.max_queued == 0 and config.port == 9000

    path.write_text("connections: {header_timeout_s: 5, keepalive_s: 20}\nmax_body_bytes: 1000\n")
    flags = ["--config", str(path), "--body-timeout", "9", "--body-min-rate", "2KiB"]
    flags += ["--max-body-size", "1MiB", "--max-connections-per-client", "7", "--no-reuse-port"]
    flags += ["--drain-timeout", "4"]
    config = config_from_args(parser.parse_args(flags))
    limits = config.connections
    assert (limits.header_timeout_s, limits.keepalive_s, limits.body_timeout_s) == (5, 20, 9)
    assert (limits.body_min_rate, limits.max_connections_per_client) == (2048, 7)
    assert (config.max_body_bytes, config.reuse_port, config.drain_timeout_s) == (1 << 20, False, 4)
    with pytest.raises(ValueError, match="timeouts"):
        config_from_args(parser.parse_args(["--header-timeout", "0"]))

    path.write_text("prot: 9000\n")
    with pytest.raises(ValueError, match="unknown router setting"):
        load_config_file(path)
    with pytest.raises(ValueError, match="retry"):
        RouterConfig.from_dict({"retry": {"max_attempts": 0}})
