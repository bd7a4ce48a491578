#!/usr/bin/env bash
# Install the peers of the router benchmark beside the project: sglang-router and vllm-router (PyPI, in
# their own venv .venv-peers so their dependencies never touch ours) and wrk (Debian) as the load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null || ! command -v valgrind >/dev/null; then  # valgrind: router_instructions.sh
    (apt-get update -qq && apt-get install -y -qq wrk valgrind) >/dev/null
fi
[[ -x .venv-peers/bin/python ]] || python3 -m venv .venv-peers
.venv-peers/bin/python -m pip --disable-pip-version-check -q install sglang-router vllm-router
echo "peers: $(.venv-peers/bin/python -m pip list 2>/dev/null | grep -iE '^(sglang-router|vllm-router) ' | tr -s ' ' | paste -sd ', ')"
