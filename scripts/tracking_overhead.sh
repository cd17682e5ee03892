#!/usr/bin/env bash
# Wall time of the default `dvc repro` with tracking on (embedded SQLite store, created by the run) and
# off, interleaved (on off / off on / ...), each in a fresh clone of this repository's HEAD.
#
#   scripts/tracking_overhead.sh [ROUNDS]     (default 2: four complete runs of the digits default)
#
# Prints one line per run and the ratio of the mean wall times. The clones are deleted afterwards unless
# KEEP is set (then their folder is printed: the "on" clones hold a tracking store, mlflow.db).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-2}
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
unset MLFLOW_TRACKING_URI MLFLOW_EXPERIMENT_NAME SSLKD_PIPELINE_ID
work=$(mktemp -d)
if [ -n "${KEEP:-}" ]; then echo "clones in $work"; else trap 'rm -rf "$work"' EXIT; fi

one_run() {  # $1: on | off, $2: round
    local dir="$work/$1-$2" start end
    git clone -q "$repo" "$dir"
    start=$(date +%s.%N)
    # PYTHONPATH: the clone's sslkd even where the installed one is an editable install of another tree
    (cd "$dir" && SSLKD_TRACKING=$1 PYTHONPATH="$dir" dvc repro >"$work/$1-$2.log" 2>&1) \
        || { tail -20 "$work/$1-$2.log" >&2; exit 1; }
    end=$(date +%s.%N)
    echo "$1 $2 $(python3 -c "print(f'{$end - $start:.1f}')")"
}

for round in $(seq "$rounds"); do
    if [ $((round % 2)) = 1 ]; then order="on off"; else order="off on"; fi
    for mode in $order; do one_run "$mode" "$round"; done
done | tee "$work/times"
python3 - "$work/times" <<'EOF'
import statistics, sys
times = {"on": [], "off": []}
for line in open(sys.argv[1]):
    mode, _, seconds = line.split()
    times[mode].append(float(seconds))
on, off = statistics.fmean(times["on"]), statistics.fmean(times["off"])
print(f"mean wall time: tracking on {on:.1f} s, off {off:.1f} s, ratio {on / off:.3f} ({100 * (on / off - 1):+.1f}%)")
EOF
