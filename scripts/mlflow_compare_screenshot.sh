#!/usr/bin/env bash
# A PNG of the MLflow UI's run-comparison page for the method (evaluate@<method>) runs of the latest
# pipeline in the workspace's tracking store, taken with headless Chromium.
#
#   scripts/mlflow_compare_screenshot.sh [OUT.png]      (default: results/mlflow_compare.png)
#
# Uses ./mlflow.db when it holds evaluate runs, otherwise runs `dvc repro` first (the digits default:
# minutes). Installs chromium with apt-get when it is missing (root, ~20 s). Starts `mlflow server` on a
# free loopback port in its own process group and stops the whole group on exit.
# Environment: WORKSPACE (the study folder; default: this repository), PYTHON (default: python3),
# EXPERIMENT (default: sslkd-<setting>), WINDOW (default: 2200,2600).
set -euo pipefail
cd "${WORKSPACE:-$(dirname "$0")/..}"
OUT=${1:-results/mlflow_compare.png}
PYTHON=${PYTHON:-python3}
WINDOW=${WINDOW:-2200,2600}
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
unset MLFLOW_TRACKING_URI
experiment=()
[ -n "${EXPERIMENT:-}" ] && experiment=(--experiment "$EXPERIMENT")

if ! "$PYTHON" -m sslkd compare "${experiment[@]}" >/dev/null 2>&1; then
    echo "no evaluate runs in ./mlflow.db: running dvc repro" >&2
    "$PYTHON" -m dvc repro
fi
if ! command -v chromium >/dev/null; then
    apt-get install -y --no-install-recommends chromium >/dev/null
fi

port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
profile=$(mktemp -d)
set -m  # the server gets its own process group: it forks workers that a plain kill would leave behind
"$PYTHON" -m mlflow server --backend-store-uri "sqlite:///$PWD/mlflow.db" --artifacts-destination "$PWD/mlartifacts" \
    --host 127.0.0.1 --port "$port" --workers 1 >"$log" 2>&1 &
server=$!
set +m
trap 'kill -TERM -- -$server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$log" "$profile"' EXIT
for _ in $(seq 180); do
    "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || { tail -20 "$log" >&2; exit 1; }
    sleep 1
done

url=$(MLFLOW_TRACKING_URI="http://127.0.0.1:$port" "$PYTHON" -m sslkd compare "${experiment[@]}" \
      | tee /dev/stderr | sed -n 's/^side by side in the MLflow UI: //p')
mkdir -p "$(dirname "$OUT")"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --virtual-time-budget=20000 \
    --window-size="$WINDOW" --screenshot="$OUT" "$url" 2>/dev/null
echo "wrote $OUT ($url)"
