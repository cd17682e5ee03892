#!/bin/sh
# Entry point of the sslkd image. The working directory (/workspace, a mounted volume) is the study:
# when it has no dvc.yaml it is seeded with the study from the image and made a git repository (DVC
# experiments need git). Then:
#   (no arguments: the image's CMD)  dvc repro
#   <stage> [options]                sslkd <stage> [options]    e.g. `docker run sslkd distill --bind ...`
#   -h | --help | -v ...             sslkd ...
#   any other command                run as it is              e.g. `docker run sslkd dvc exp show`
# The workspace's own sslkd/ (the code its DVC stages depend on) is what runs, as in a checkout.
set -eu

STUDY=${SSLKD_STUDY:-/opt/sslkd/study}
STAGES="data teacher represent experts init distill krr_st mtt_ssl evaluate transfer report variance"

fail() {
    echo "sslkd-entrypoint: error: $*" >&2
    exit 2
}

is_stage() {
    for stage in $STAGES compare; do
        [ "$1" = "$stage" ] && return 0
    done
    return 1
}

seed_workspace() {
    [ -w . ] || fail "the workspace $PWD is not writable by uid $(id -u); mount a folder you own and run with --user \"\$(id -u):\$(id -g)\""
    [ -e dvc.yaml ] && return 0
    echo "sslkd-entrypoint: seeding $PWD with the study (dvc.yaml, params.yaml, gin/, sslkd/)" >&2
    cp -Rn "$STUDY/." .
    if [ ! -e .git ]; then
        git init -q
        git add -A
        git -c user.name=sslkd -c user.email=sslkd@localhost commit -q -m "sslkd study as shipped in the image"
    fi
}

use_workspace_code() {
    [ -f sslkd/__init__.py ] || return 0
    if ! diff -rq -x __pycache__ sslkd "$STUDY/sslkd" > /dev/null 2>&1; then
        echo "sslkd-entrypoint: note: the workspace's sslkd/ differs from the image's; running the workspace's" >&2
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

# A user id without a passwd entry (--user UID:GID) gets HOME=/, which it cannot write.
[ -w "${HOME:-/}" ] || export HOME=/tmp

[ $# -gt 0 ] || set -- dvc repro
case "$1" in
    -*) set -- sslkd "$@" ;;
    *) if is_stage "$1"; then set -- sslkd "$@"; fi ;;
esac
needs_study=no
case "$1" in
    dvc) needs_study=yes ;;
    sslkd) for arg in "$@"; do if is_stage "$arg"; then needs_study=yes; fi; done ;;
esac
if [ "$needs_study" = yes ]; then
    seed_workspace
    use_workspace_code
    # Stages leave their MLflow runs to a background uploader (sslkd/infra/tracking_upload.py), which would
    # stop with the container: send what is still pending before leaving.
    status=0
    "$@" || status=$?
    if [ -d .sslkd-tracking ]; then python -m sslkd.infra.tracking_upload --drain .sslkd-tracking || true; fi
    exit "$status"
fi
exec "$@"
