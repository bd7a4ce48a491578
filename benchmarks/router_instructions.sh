#!/usr/bin/env bash
# The router's instructions per request (valgrind's callgrind, the Ir count): the same to about 0.01% back
# to back and 0.5% over a day, where requests/s and CPU time move by +-2% on a shared machine, so a change
# of 1% to the hot path shows. Two mock workers, round robin, N chat requests over C keep-alive connections (the count is
# turned on after start-up and a warm-up, off before the stop).
#
# Usage: benchmarks/router_instructions.sh [TREE] [N] [C] [TOKENS]   (TREE: a source tree, default this
# checkout, e.g. a `git worktree` of the code before a change; TOKENS: streamed answers of that many
# tokens, each its own chunk, instead of whole ones). Needs valgrind (Debian: valgrind).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TREE=$(realpath "${1:-$ROOT}"); N=${2:-2000}; C=${3:-16}; TOKENS=${4:-0}
PY="$ROOT/.venv/bin/python"
OUT=$(mktemp /tmp/callgrind.XXXXXX)
PORT=$("$PY" -c "from microserve.processes import free_port; print(free_port())")
W1=$("$PY" -c "from microserve.processes import free_port; print(free_port())")
W2=$("$PY" -c "from microserve.processes import free_port; print(free_port())")
cd /tmp
"$PY" "$ROOT/benchmarks/mock_worker.py" "$W1" >/dev/null 2>&1 & P1=$!
"$PY" "$ROOT/benchmarks/mock_worker.py" "$W2" >/dev/null 2>&1 & P2=$!
PYTHONPATH=$TREE valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT" \
    "$PY" -P -m microserve --log-level warning router --port "$PORT" --policy round_robin \
    --worker "http://127.0.0.1:$W1,kind=openai,model=mock" --worker "http://127.0.0.1:$W2,kind=openai,model=mock" \
    >/dev/null 2>&1 & R=$!
trap 'kill $P1 $P2 $R 2>/dev/null || true; rm -f "$OUT"' EXIT
"$PY" "$ROOT/benchmarks/keepalive_load.py" "$PORT" 200 "$C" --wait 300  # up, and warm
callgrind_control -i on "$R" >/dev/null 2>&1
"$PY" "$ROOT/benchmarks/keepalive_load.py" "$PORT" "$N" "$C" --stream "$TOKENS"
callgrind_control -i off "$R" >/dev/null 2>&1
kill -INT "$R"; wait "$R" || true
ir=$(awk '/^totals:/{print $2; exit}' "$OUT")
echo "$(basename "$TREE"): $((ir / N)) instructions a request ($N requests, $C connections, $TOKENS streamed tokens)"
