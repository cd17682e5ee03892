#!/usr/bin/env bash
# One prepared run on a lent GPU machine, the source of README "Running on a GPU":
#   1. benchmarks/run.py at the paper's CIFAR setting (width 128, batch 256, syn_steps 40: full vs adjoint
#      unroll, eager and compiled, and expert training) and at TinyImageNet 2% (does it fit one GPU?);
#   2. the cifar10_gpu study, shrunk to fit a few minutes (the bindings below), stage by stage with `sslkd`:
#      DATA_NPZ's images (the device run carried a class-balanced 20k of the 50k: only 64 MiB travel),
#      a 30-epoch teacher, 32 experts, 2% = 360 images, as many distillation iterations as fit 90 s at the
#      adjoint's measured s/iteration (50 to 300), eager steps (no compile time), probes at 1% and 5%.
#
#   bash benchmarks/gpu_session.sh OUT_DIR DATA_NPZ
#
# OUT_DIR gets log.txt, the benchmark JSONs and study.tar.gz (results/, evaluations, sidecars), refreshed
# after every stage so that a run stopped at its time limit still leaves what it finished.
# Environment: DEVICE (default cuda), PYTHON (default python3), BENCH_ARGS and STUDY_BINDS (extra options
# and bindings, one a line, applied last: for a dry run on a CPU, DEVICE=cpu with tiny sizes), STUDY_DIR
# (default /tmp/sslkd-gpu-study).
set -u -o pipefail
out=${1:?usage: gpu_session.sh OUT_DIR DATA_NPZ}
data=${2:?usage: gpu_session.sh OUT_DIR DATA_NPZ}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
study=${STUDY_DIR:-/tmp/sslkd-gpu-study}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1 SSLKD_TRACKING=off
began=$(date +%s)
say() { echo "[$(date +%T) +$(($(date +%s) - began))s] $*"; }

say "machine: $(nproc) CPUs; $($python -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

# --- 1. benchmarks (each capped, so that the study keeps its time) -------------------------------
# shellcheck disable=SC2086
timeout 300 $python benchmarks/run.py --device "$device" --preset paper --syn-steps 40 \
    --variants full,adjoint,adjoint_compiled --no-experts --out "$out/bench_paper.json" ${BENCH_ARGS:-} \
    || say "paper benchmark failed or timed out (rc $?)"
# shellcheck disable=SC2086
timeout 120 $python benchmarks/run.py --device "$device" --preset tinyimagenet_2pct --variants full,adjoint \
    --no-experts --out "$out/bench_tinyimagenet_2pct.json" ${BENCH_ARGS:-} \
    || say "TinyImageNet benchmark failed or timed out (rc $?)"

# --- 2. the cifar10_gpu study, shrunk ----------------------------------------------------------------
rm -rf "$study" && mkdir -p "$study"
seconds_per_iteration=$($python -c 'import json, sys; print(json.load(open(sys.argv[1]))["distill"]["adjoint"]["40"]["s_per_iter"])' \
    "$out/bench_paper.json" 2>/dev/null || echo 0.6)
iterations=$($python -c "print(max(50, min(300, int(90 / $seconds_per_iteration))))")
say "distillation: $iterations iterations (adjoint, eager: $seconds_per_iteration s/iteration measured above)"
binds=(--bind "sslkd.data.root = '$(realpath "$data")'")
while IFS= read -r line; do [ -n "$line" ] && binds+=(--bind "$line"); done <<EOF
sslkd.ssl.epochs = 30
sslkd.experts.num_experts = 32
sslkd.experts.compile = False
sslkd.init.size = 360
sslkd.distill.iterations = $iterations
sslkd.distill.compile = False
sslkd.pretrain.compile = False
sslkd.pretrain.min_steps = 1420
sslkd.probe.label_fractions = (0.01, 0.05)
${STUDY_BINDS:-}
EOF
pack() {
    (cd "$study" && find results artifacts -name '*.json' -o -name '*.md' -o -name '*.png' 2>/dev/null \
        | tar -czf "$out/study.tar.gz" -T - 2>/dev/null) || true
}
stage() {
    local started=$SECONDS
    say "sslkd $*"
    if $python -m sslkd "$@" --setting cifar10_gpu --workdir "$study" --device "$device" "${binds[@]}"; then
        say "done in $((SECONDS - started)) s: sslkd $*"
        pack
    else
        say "FAILED after $((SECONDS - started)) s: sslkd $*"
        pack
        exit 1
    fi
}
stage data
stage teacher
stage represent
stage experts
stage init
stage distill
for method in mkdt random high_loss full_data no_pretrain; do
    stage evaluate --method "$method"
done
stage report
cat "$study/results/summary.md" 2>/dev/null
say "finished"
