#!/usr/bin/env bash
# Set up with the test tools, then lint, type-check and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check microserve tests benchmarks
.venv/bin/ruff format --check microserve tests benchmarks
.venv/bin/python -m mypy  # the whole package; strict on engine/ and router/ (pyproject.toml)
.venv/bin/python -m pytest "$@"
