#!/usr/bin/env bash
# Wall and CPU time of the default `dvc repro` with tracking on (embedded SQLite store, created by the
# run) and off, each in a fresh clone of this repository's HEAD. With tracking on, the wall time includes
# the upload of every run (--drain waits for and sends what is left), and the CPU time adds the detached
# uploader's own, which it logs when it exits.
#
#   scripts/tracking_overhead.sh [ROUNDS]     (default 2: four complete runs of the digits default)
#
# The two runs of a round go one after the other, alternating which goes first; with TOGETHER=1 they
# start at the same moment instead, so that on a shared machine both meet the same load. Prints each
# run's wall time and CPU time (user + system of dvc and every stage process: waited-for children
# count) and the ratios of the means. KEEP=1 keeps the clones (the "on" ones hold mlflow.db).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-2}
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
unset MLFLOW_TRACKING_URI MLFLOW_EXPERIMENT_NAME SSLKD_PIPELINE_ID
work=$(mktemp -d)
if [ -n "${KEEP:-}" ]; then echo "clones in $work" >&2; else trap 'rm -rf "$work"' EXIT; fi

one_run() {  # $1: on | off, $2: round
    local dir="$work/$1-$2"
    git clone -q "$repo" "$dir"
    # PYTHONPATH: the clone's sslkd even where the installed one is an editable install of another tree
    # Tracking on: the time includes sending every run (the uploader works while, and after, dvc repro
    # runs: --drain waits for and sends what is left); the next run starts once the uploader has exited.
    local command="dvc repro"
    [ "$1" = on ] && command="dvc repro && python3 -m sslkd.infra.tracking_upload --drain .sslkd-tracking"
    /usr/bin/time -f "%e %U %S" -o "$work/$1-$2.time" \
        env -C "$dir" SSLKD_TRACKING="$1" PYTHONPATH="$dir" sh -c "$command" >"$work/$1-$2.log" 2>&1 \
        || { tail -20 "$work/$1-$2.log" >&2; return 1; }
    if [ "$1" = on ]; then
        env -C "$dir" PYTHONPATH="$dir" python3 -c "import time; from pathlib import Path
from sslkd.infra.tracking_upload import uploader_running
while uploader_running(Path('.sslkd-tracking')): time.sleep(1)"
        sed -n 's/.*uploader exits: \([0-9.]*\) s CPU.*/\1/p' "$dir/.sslkd-tracking/uploader.log" \
            | awk '{s += $1} END {print s + 0}' > "$work/$1-$2.uploader_cpu"
    fi
    [ -f "$work/$1-$2.uploader_cpu" ] || echo 0 > "$work/$1-$2.uploader_cpu"
    python3 -c "import sys; wall, user, system = map(float, open(sys.argv[1]).read().split()[-3:]); \
uploader = float(open(sys.argv[2]).read()); \
print(f'$1 $2 wall {wall:.1f} s cpu {user + system + uploader:.1f} s (uploader {uploader:.1f} s)')" \
        "$work/$1-$2.time" "$work/$1-$2.uploader_cpu"
}

for round in $(seq "$rounds"); do
    if [ -n "${TOGETHER:-}" ]; then
        one_run on "$round" & on=$!; one_run off "$round" & off=$!
        wait "$on"; wait "$off"
    elif [ $((round % 2)) = 1 ]; then
        one_run on "$round"; one_run off "$round"
    else
        one_run off "$round"; one_run on "$round"
    fi
done | tee "$work/times"
python3 - "$work/times" <<'EOF'
import statistics, sys
runs = [line.split() for line in open(sys.argv[1])]
for column, name in ((3, "wall time"), (6, "CPU time")):
    on = statistics.fmean(float(run[column]) for run in runs if run[0] == "on")
    off = statistics.fmean(float(run[column]) for run in runs if run[0] == "off")
    ratio = on / off if off else float("nan")
    print(f"mean {name}: tracking on {on:.1f} s, off {off:.1f} s, ratio {ratio:.3f} ({100 * (ratio - 1):+.1f}%)")
EOF
