"""Tokens from a flag, a file or the environment; loopback detection; the engine's refusal to expose its
KV verbs beyond loopback without a token; bearer checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from microserve.tokens import (
    bearer_matches,
    generate_token,
    is_loopback,
    require_internal_token,
    resolve_token,
)

ENV = "MICROSERVE_TEST_TOKEN"


def test_a_flag_wins_then_a_file_then_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV, "from-env")
    file = tmp_path / "token"
    file.write_text("  from-file\n")
    assert resolve_token("internal-token", "from-flag", None, ENV) == "from-flag"
    assert resolve_token("internal-token", None, str(file), ENV) == "from-file"
    assert resolve_token("internal-token", None, None, ENV) == "from-env"
    monkeypatch.delenv(ENV)
    assert resolve_token("internal-token", None, None, ENV) is None


def test_bad_token_sources_say_what_is_wrong(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="not both"):
        resolve_token("admin-token", "x", str(empty), ENV)
    with pytest.raises(ValueError, match="is empty"):
        resolve_token("admin-token", None, str(empty), ENV)
    with pytest.raises(ValueError, match="cannot read the token file"):
        resolve_token("admin-token", None, str(tmp_path / "missing"), ENV)
    with pytest.raises(ValueError, match="--admin-token is empty"):
        resolve_token("admin-token", "", None, ENV)


def test_generated_tokens_are_long_and_distinct() -> None:
    tokens = {generate_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) >= 43 for t in tokens)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("engine.example", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_an_engine_beyond_loopback_needs_a_token() -> None:
    require_internal_token("127.0.0.1", None)
    require_internal_token("0.0.0.0", "t")
    with pytest.raises(ValueError, match=r"--host 0\.0\.0\.0 is reachable beyond loopback"):
        require_internal_token("0.0.0.0", None)


def test_bearer_matches_only_the_exact_token() -> None:
    assert bearer_matches("Bearer s3cret", "s3cret")
    assert bearer_matches("bearer  s3cret ", "s3cret")
    assert not bearer_matches("Bearer s3cre", "s3cret")
    assert not bearer_matches("Basic s3cret", "s3cret")
    assert not bearer_matches(None, "s3cret")


def test_the_engine_command_refuses_to_start_beyond_loopback_without_a_token(monkeypatch) -> None:
    monkeypatch.delenv("MICROSERVE_INTERNAL_TOKEN", raising=False)
    cmd = [sys.executable, "-m", "microserve", "engine", "--backend", "sim", "--host", "0.0.0.0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("microserve: error: --host 0.0.0.0 is reachable")
    assert "--internal-token-file" in lines[0]
