#!/usr/bin/env bash
# End-to-end check of the container on a Debian 12 machine without registry access (like ours):
#  1. starts a private Docker engine (its own data root, exec root and socket; no iptables, no bridge),
#  2. builds a local stand-in for the Dockerfile's default base image (debootstrapped Debian bookworm
#     with python3, python3-venv and this machine's CA bundle), since no image can be pulled,
#  3. builds the sslkd image, torch coming from this machine's local package indexes served on loopback,
#  4. runs the study on the embedded default (digits) with --network none and a mounted workspace,
#     checks results/summary.json on the host, that a second run reruns nothing, and torch's CUDA build,
#  5. stops the engine and the index server and removes what it made, also when a step fails or the
#     run is stopped (SIGTERM, SIGINT).
#
#   scripts/docker-e2e.sh [--keep] [--dir DIR]
#   scripts/docker-e2e.sh --clean --dir DIR
#     --keep     keep DIR (images, build cache, workspace, logs); the engine is stopped either way
#     --dir DIR  work in DIR (default: a new folder under /var/tmp); a later run with the same DIR
#                reuses the kept base image and build cache
#     --clean    remove what a run in DIR that was SIGKILLed left: the processes it started that are
#                named in its pid files or name DIR on their command line (engine, containerd, shims,
#                containers, index server), its mounts, DIR itself
#
# Needs root, apt (docker.io and debootstrap are installed when missing) and ~15 GB of free disk (the
# image is 6.9 GB). Measured on an idle 2-core machine: base image 49 s, build 208 s, study 181 s.
set -euo pipefail

# The script is one brace group, which bash reads whole before running it: editing this file during
# a run (which takes long) cannot change what that run does.
{
KEEP=0
CLEAN=0
DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) KEEP=1 ;;
        --clean) CLEAN=1 ;;
        --dir) DIR=${2:?--dir needs a folder}; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "docker-e2e: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
BASE_IMAGE=$(sed -n 's/^ARG BASE_IMAGE=//p' "$REPO/Dockerfile")
IMAGE=sslkd:e2e
REQUIRED_FREE_GB=15
METHODS=(mkdt random high_loss no_pretrain full_data krr_st mtt_ssl)

log() { echo "docker-e2e: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (dockerd, debootstrap, apt-get)"
[ -n "$BASE_IMAGE" ] || die "no 'ARG BASE_IMAGE=' default in $REPO/Dockerfile"
if [ "$CLEAN" = 1 ]; then
    [ -n "$DIR" ] && [ "$KEEP" = 0 ] || die "--clean needs --dir DIR and no --keep"
    [ -d "$DIR" ] || exit 0
fi
if [ -z "$DIR" ]; then
    DIR=$(mktemp -d /var/tmp/sslkd-docker-e2e.XXXXXX)
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
case "$DIR/" in "$REPO"/*) die "--dir must lie outside the repository (the build context)" ;; esac
ENGINE=$DIR/engine
WORKSPACE=$DIR/workspace
ROOTFS=$DIR/rootfs
INDEXES=$DIR/indexes
DOCKERD_PID=""
SERVER_PID=""

# shellcheck disable=SC2329  # called from cleanup, the EXIT trap
stop_leftovers() {  # SIGKILL what this run started and left: see --clean
    local started now pid age
    started=$(stat -c %Y "$DIR/started" 2> /dev/null) || return 0
    now=$(date +%s)
    {
        # the processes in pid files (engine, containerd, the containers' first processes, index server);
        # -xdev: not into the containers' root file systems, whose pid files hold their own namespace's pids
        find "$DIR" -xdev -name '*.pid' -type f -exec awk 1 {} + 2> /dev/null  # awk 1: a newline after each
        # those whose command line names this folder (containerd's shims keep running without it)
        grep -lsF -- "$DIR/" /proc/[0-9]*/cmdline | cut -d / -f 3
    } | tr -cs '0-9' '\n' | sort -nu | while IFS= read -r pid; do
        [ -n "$pid" ] && [ "$pid" -gt 1 ] && [ "$pid" != "$$" ] || continue
        age=$(ps -o etimes= -p "$pid" 2> /dev/null | tr -d ' ')
        # gone, or a newer process that reuses the pid of one that is gone: not ours
        [ -n "$age" ] && [ $((now - age)) -ge $((started - 2)) ] || continue
        log "stopping pid $pid: $(tr '\0' ' ' < "/proc/$pid/cmdline" 2> /dev/null | cut -c 1-100)"
        kill -KILL "$pid" 2> /dev/null
    done
}

# shellcheck disable=SC2329  # called from cleanup, the EXIT trap
unmount_below() {  # everything mounted under $1, deepest first
    local mounts
    mounts=$(awk -v root="$1/" 'index($2 "/", root) == 1 { print $2 }' /proc/mounts | sort -r)
    for mount in $mounts; do
        umount "$mount" 2> /dev/null || umount -l "$mount" || log "could not unmount $mount"
    done
}

# shellcheck disable=SC2329  # the EXIT trap
cleanup() {
    local rc=$?
    set +e
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2> /dev/null; then
        docker ps -aq | xargs -r docker rm -f > /dev/null
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2> /dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2> /dev/null; then
            log "dockerd did not stop in 30 s; killing it"
            kill -KILL "$DOCKERD_PID"
        fi
        wait "$DOCKERD_PID" 2> /dev/null
    fi
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2> /dev/null
        wait "$SERVER_PID" 2> /dev/null
    fi
    stop_leftovers  # what outlived the engine (its shims and containers), or a killed run's everything
    unmount_below "$DIR"  # the engine's netns/default, and debootstrap's /proc after a failure
    if [ "$rc" != 0 ]; then
        for name in dockerd build run; do
            [ ! -s "$DIR/$name.log" ] || { log "last lines of $DIR/$name.log:"; tail -n 25 "$DIR/$name.log" >&2; }
        done
    fi
    if [ "$KEEP" = 1 ]; then
        log "kept $DIR (restart the engine the same way and use DOCKER_HOST=unix://$ENGINE/docker.sock)"
    else
        rm -rf --one-file-system "$ENGINE" "$WORKSPACE" "$ROOTFS" "$INDEXES" "$DIR"/*.log "$DIR"/*.pid "$DIR/started"
        rmdir "$DIR" 2> /dev/null
        [ ! -e "$DIR" ] || { log "could not remove all of $DIR"; [ "$rc" != 0 ] || rc=1; }
    fi
    if [ "$CLEAN" = 1 ]; then
        [ "$rc" = 0 ] && log "cleaned $DIR"
    elif [ "$rc" = 0 ]; then log "passed"; else log "FAILED (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
[ "$CLEAN" = 0 ] || exit 0  # cleanup (the EXIT trap) does the rest
touch "$DIR/started"  # stop_leftovers: the processes that started since

free_gb=$(df -Pk "$DIR" | awk 'NR == 2 { print int($4 / 1048576) }')
[ "$free_gb" -ge "$REQUIRED_FREE_GB" ] || die "only $free_gb GB free under $DIR; needs $REQUIRED_FREE_GB GB"

install_if_missing() {  # command, Debian package
    command -v "$1" > /dev/null && return 0
    log "installing $2"
    apt-get install -y -qq --no-install-recommends "$2" > /dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$2" > /dev/null; }
}
install_if_missing dockerd docker.io
install_if_missing debootstrap debootstrap

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {  # seconds, description, command...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq "$((seconds * 2))"); do
        "$@" > /dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "$what did not come up in $seconds s"
}

# --- the machine's local package indexes (pip config: file://.../simple), served on loopback ---------
index_urls=()
local_indexes=$(python3 -m pip config list 2> /dev/null | grep -oE "file://[^' ]+/simple/?" | awk '!seen[$0]++' || true)
if [ -n "$local_indexes" ]; then
    mkdir -p "$INDEXES"
    port=$(free_port)
    n=0
    for url in $local_indexes; do
        folder=${url#file://}
        folder=${folder%/}
        folder=${folder%/simple}
        [ -d "$folder/simple" ] || continue
        ln -sfn "$folder" "$INDEXES/index$n"
        index_urls+=("http://127.0.0.1:$port/index$n/simple")
        n=$((n + 1))
    done
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$INDEXES" > "$DIR/indexes.log" 2>&1 &
    SERVER_PID=$!
    echo "$SERVER_PID" > "$DIR/indexes.pid"
    wait_for 20 "the index server" python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')"
    log "serving ${#index_urls[@]} local package indexes on 127.0.0.1:$port"
else
    log "no local package indexes in pip's config: torch comes from PyPI (several GB)"
fi

# --- the engine ----------------------------------------------------------------------------------------
mkdir -p "$ENGINE"
export DOCKER_HOST=unix://$ENGINE/docker.sock
dockerd --storage-driver=overlay2 --iptables=false --ip6tables=false --bridge=none \
    --data-root "$ENGINE/root" --exec-root "$ENGINE/exec" -H "$DOCKER_HOST" \
    --pidfile "$ENGINE/dockerd.pid" > "$DIR/dockerd.log" 2>&1 &
DOCKERD_PID=$!
wait_for 60 "dockerd" docker version
log "engine up: $(docker version --format 'server {{.Server.Version}}, client {{.Client.Version}}')"

# --- a local stand-in for the default base image ------------------------------------------------------
if docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
    log "base image $BASE_IMAGE already in the engine"
else
    mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2> /dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    log "building $BASE_IMAGE: debootstrap bookworm from $mirror"
    start=$SECONDS
    rm -rf --one-file-system "$ROOTFS"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$mirror" \
        > "$DIR/debootstrap.log" 2>&1 || { tail -n 20 "$DIR/debootstrap.log" >&2; die "debootstrap failed"; }
    # Outbound TLS here is intercepted: the image must trust this machine's CA bundle, or pip fails.
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
    if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
    fi
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    tar -C "$ROOTFS" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' \
        - "$BASE_IMAGE" > /dev/null
    rm -rf --one-file-system "$ROOTFS"
    log "base image built in $((SECONDS - start)) s"
fi

# --- the sslkd image --------------------------------------------------------------------------------
build_args=()
if [ ${#index_urls[@]} -gt 0 ]; then
    # As in this machine's pip config, the local indexes come after PyPI: where both offer the same
    # wheel, pip takes the last index's (checked below from the index server's log).
    build_args=(--build-arg "PIP_EXTRA_INDEX_URL=${index_urls[*]}" --build-arg "PIP_TRUSTED_HOST=127.0.0.1")
fi
log "building $IMAGE from $REPO (log: $DIR/build.log)"
start=$SECONDS
DOCKER_BUILDKIT=0 docker build --network host "${build_args[@]}" -t "$IMAGE" "$REPO" > "$DIR/build.log" 2>&1
build_seconds=$((SECONDS - start))
image_gb=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.2f", $1 / 1e9 }')
context=$(grep -m1 -o 'Sending build context to Docker daemon *[0-9.]* *[kMG]*B' "$DIR/build.log" | awk '{ print $NF }' || true)
torch_from="PyPI or the build cache (not this run's index server)"
if [ -s "$DIR/indexes.log" ] && grep -q 'GET /index[0-9]*/files/torch-2' "$DIR/indexes.log"; then
    torch_from="the local package index on loopback"
fi
log "image built in $build_seconds s: $image_gb GB (build context ${context:-?}); torch from $torch_from"

# --- the study, in the container, on a mounted workspace ---------------------------------------------
rm -rf --one-file-system "$WORKSPACE"
mkdir -p "$WORKSPACE"
chown "$(docker image inspect -f '{{.Config.User}}' "$IMAGE")" "$WORKSPACE"  # the image's non-root user
log "running the study: docker run --rm --network none -v $WORKSPACE:/workspace $IMAGE (log: $DIR/run.log)"
start=$SECONDS
docker run --rm --name sslkd-e2e-study --network none -v "$WORKSPACE:/workspace" "$IMAGE" > "$DIR/run.log" 2>&1 &
study_pid=$!
# The container's CPU time, from the engine's stats every 10 s: unlike the wall time, it hardly depends on
# what else runs on the machine (CPU time / cores ~ the wall time on an idle machine).
cpu_ns=0
while kill -0 "$study_pid" 2> /dev/null; do
    stats=$(curl -sf --max-time 20 --unix-socket "$ENGINE/docker.sock" \
        "http://localhost/containers/sslkd-e2e-study/stats?stream=false&one-shot=true" || true)
    usage=$(grep -o '"cpu_usage":{"total_usage":[0-9]*' <<< "$stats" | head -n 1 | grep -o '[0-9]*$' || true)
    cpu_ns=${usage:-$cpu_ns}
    sleep 10
done
wait "$study_pid"
run_seconds=$((SECONDS - start))
run_cpu_seconds=$((cpu_ns / 1000000000))
log "study ran in $run_seconds s, $run_cpu_seconds s of CPU time (sampled every 10 s)"

python3 - "$WORKSPACE/results/summary.json" "${METHODS[@]}" << 'EOF'
import json, math, sys
path, methods = sys.argv[1], set(sys.argv[2:])
summary = json.load(open(path))
differences = {key: rows for key, rows in summary.items() if " - " in key}
summary = {key: rows for key, rows in summary.items() if key not in differences}
assert set(summary) == methods, f"methods {sorted(summary)} != {sorted(methods)}"
expected = {f"mkdt - {b}" for b in ("random", "high_loss", "no_pretrain", "krr_st", "mtt_ssl")}
expected |= {f"full_data - {b}" for b in ("random", "no_pretrain")}
assert set(differences) == expected, sorted(differences)
for name, rows in differences.items():
    assert set(rows) == set(summary["mkdt"]), f"{name}: label fractions {sorted(rows)}"
    assert all({"mean", "std", "n", "sem"} <= set(cell) for cell in rows.values()), f"{name}: {rows}"
fractions = set(summary["mkdt"])
for method, rows in summary.items():
    assert rows and set(rows) == fractions, f"{method}: label fractions {sorted(rows)} != {sorted(fractions)}"
    for fraction, cell in rows.items():
        float(fraction)
        assert set(cell) == {"mean", "std", "n"}, f"{method}/{fraction}: keys {sorted(cell)}"
        assert 0 <= cell["mean"] <= 100 and cell["std"] >= 0 and not math.isnan(cell["std"]), f"{method}/{fraction}: {cell}"
        assert isinstance(cell["n"], int) and cell["n"] >= 1, f"{method}/{fraction}: n = {cell['n']}"
print(f"docker-e2e: {path}: {len(summary)} methods x label fractions {sorted(fractions, key=float)}", file=sys.stderr)
EOF
cat "$WORKSPACE/results/summary.md" >&2
owner=$(stat -c %u "$WORKSPACE/results/summary.json")
[ "$owner" != 0 ] || die "results/summary.json is owned by root: the container did not run as its non-root user"
git -c safe.directory="$WORKSPACE" -C "$WORKSPACE" log --oneline -1 > /dev/null \
    || die "the seeded workspace is not a git repository"

rerun=$(docker run --rm --network none -v "$WORKSPACE:/workspace" "$IMAGE" 2>&1) \
    || { echo "$rerun" >&2; die "the second run failed"; }
if grep -q "Running stage" <<< "$rerun"; then
    echo "$rerun" >&2
    die "the second run reran stages; the workspace's dvc.lock should have made it a no-op"
fi
torch_build=$(docker run --rm --network none "$IMAGE" \
    python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, "GPU visible:", torch.cuda.is_available())')
case "$torch_build" in *"CUDA None"*) die "torch in the image is not a CUDA build: $torch_build" ;; esac

log "summary: base $BASE_IMAGE; build $build_seconds s; study $run_seconds s ($run_cpu_seconds s CPU);" \
    "image $image_gb GB; torch $torch_build"
exit 0
}
