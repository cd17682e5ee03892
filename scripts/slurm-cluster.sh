#!/usr/bin/env bash
# A real single-node SLURM cluster in a folder, for tests and CI (run as root; Debian's slurm-wlm + munge).
#
#   scripts/slurm-cluster.sh start DIR    # munged, slurmctld, slurmd; prints `export SLURM_CONF=...`
#   scripts/slurm-cluster.sh stop DIR     # stops every daemon it started, by pid
#
# Everything lives under DIR (config, state, spool, logs, pid files, munge socket) and the daemons listen
# on free ports, so it never touches a system-wide SLURM or munge. Tuned for tests: a requeued job may
# start again after 10 s (cred_expire; 120 s by default) and pending jobs are tried every 2 s.
# Clients (sinfo, sbatch, submitit) need SLURM_CONF=DIR/slurm.conf in their environment. Install first:
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(realpath -m "$2")

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop_pid_file() {  # stop the process in pid file $1 (TERM, then KILL after 10 s)
    local file=$1 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$file"; return 0; }
        kill -TERM "$pid" 2>/dev/null || true
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$file"
}

start() {
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install slurmctld slurmd slurm-client munge" >&2; exit 1; }
    done
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    chown munge:munge "$dir/munge"
    chmod 0755 "$dir" "$dir/munge"
    if [[ ! -s /etc/munge/munge.key ]]; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    local socket=$dir/munge/munge.socket
    runuser -u munge -- munged --socket="$socket" --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"

    local cpus memory_mb
    cpus=$(nproc)
    memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
    cat >"$dir/slurm.conf" <<EOF
ClusterName=sslkd
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N localhost
    for _ in $(seq 60); do
        if [[ $(sinfo -h -o %T 2>/dev/null) == idle ]]; then
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "SLURM did not come up within 30 s; logs in $dir" >&2
    sinfo >&2 || true
    tail -5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    return 1
}

stop() {
    [[ -d $dir ]] || return 0
    if [[ -f $dir/slurm.conf && -s $dir/slurmctld.pid ]]; then
        export SLURM_CONF=$dir/slurm.conf
        # jobs first (a job's processes outlive slurmd), then the daemons
        timeout 10 scancel --full --user="$(id -un)" >/dev/null 2>&1 || true
        for _ in $(seq 30); do
            [[ -z $(timeout 5 squeue --noheader --states=PENDING,RUNNING,COMPLETING 2>/dev/null) ]] && break
            sleep 0.5
        done
        timeout 10 scontrol shutdown >/dev/null 2>&1 || true
    fi
    stop_pid_file "$dir/slurmd.pid"
    stop_pid_file "$dir/slurmctld.pid"
    stop_pid_file "$dir/munge/munged.pid"
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
