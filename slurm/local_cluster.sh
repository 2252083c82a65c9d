#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, without systemd: for tests and for trying the
# sweep scripts before a GB200 cluster. Needs root and Debian's packages:
#     apt-get install -y slurmctld slurmd slurm-client munge
#
#     slurm/local_cluster.sh start DIR [GPUS]  # config, state and logs in DIR; prints SLURM_CONF=DIR/slurm.conf
#     slurm/local_cluster.sh stop DIR          # stops the daemons this script started, by pid
#
# GPUS > 0 gives the node Gres=gpu:GPUS, backed by GPUS device nodes DIR/dev/nvidia0.. that stand
# in for a GB200 node's GPUs: Slurm hands them out and sets each task's GPU variables as it would
# for real devices, so the sbatch scripts' GPU binding can be tested without a GPU. They are
# character devices with /dev/null's numbers (1, 3), not regular files: slurmd 22.05 drops a
# gres.conf File= that is not a character or block device ("is not a valid character or block
# device"), and the jobs then get no GPU variables at all.
#
# Every client command (sbatch, squeue, ...) needs SLURM_CONF=DIR/slurm.conf in its environment.
set -euo pipefail

usage() { echo "usage: $0 start DIR [GPUS] | stop DIR" >&2; exit 2; }
[[ $# -eq 2 || ( $# -eq 3 && $1 == start && $3 =~ ^[0-9]+$ ) ]] || usage
action=$1
dir=$(realpath -m "$2")
gpus=${3:-0}
conf=$dir/slurm.conf

start() {
    [[ $(id -u) -eq 0 ]] || { echo "local_cluster: must run as root (slurmd runs jobs as their submitting user)" >&2; exit 3; }
    for bin in munged slurmctld slurmd sinfo; do
        command -v "$bin" >/dev/null || { echo "local_cluster: $bin not found: apt-get install -y slurmctld slurmd slurm-client munge" >&2; exit 3; }
    done
    mkdir -p "$dir/state" "$dir/spool"

    # One munged per machine: reuse a running one (and leave it alone at stop), else start ours.
    if ! munge -n </dev/null >/dev/null 2>&1; then
        [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
        install -d -o munge -g munge -m 755 /run/munge
        runuser -u munge -- munged --pid-file="/run/munge/munged.pid"
        cp /run/munge/munged.pid "$dir/munged.pid"
        for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
        munge -n </dev/null >/dev/null || { echo "local_cluster: munged did not come up" >&2; exit 1; }
    fi

    local host mem_mb cpus gres="" gres_types="" overrides=""
    host=$(hostname -s)
    cpus=$(nproc)
    if (( gpus > 0 )); then
        mkdir -p "$dir/dev"
        for ((i = 0; i < gpus; i++)); do
            [[ -c $dir/dev/nvidia$i ]] || { rm -f "$dir/dev/nvidia$i"; mknod "$dir/dev/nvidia$i" c 1 3; }
        done
        echo "Name=gpu File=$dir/dev/nvidia[0-$((gpus - 1))]" >"$dir/gres.conf"
        gres="Gres=gpu:$gpus"
        gres_types="GresTypes=gpu"
        # At least two CPUs per GPU, so the GPUs, not a small machine's cores, limit how many
        # one-GPU tasks run at once; slurmd takes the configured count over the one it detects.
        (( cpus >= 2 * gpus )) || { cpus=$((2 * gpus)); overrides="SlurmdParameters=config_overrides"; }
    fi
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat >"$conf" <<EOF
ClusterName=minivllm-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
$gres_types
$overrides
ReturnToService=2
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb $gres State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$conf
    slurmctld -i
    slurmd
    # A daemon that cannot bind its port (another Slurm on this machine) exits after forking; sinfo
    # would then report the other cluster's node.
    sleep 0.5
    for daemon in slurmctld slurmd; do
        kill -0 "$(cat "$dir/$daemon.pid" 2>/dev/null)" 2>/dev/null || {
            echo "local_cluster: $daemon exited at start (is another Slurm running here?): $(tail -n 2 "$dir/$daemon.log" 2>/dev/null)" >&2
            exit 1
        }
    done
    for _ in $(seq 100); do
        [[ $(sinfo -h -N -o %t 2>/dev/null) == idle ]] && { echo "SLURM_CONF=$conf"; return 0; }
        sleep 0.2
    done
    echo "local_cluster: node not idle after 20 s; sinfo says: $(sinfo -h -N -o '%t %E' 2>&1)" >&2
    tail -n 5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    exit 1
}

# Ends the process in pid file $1: waits $2 seconds for it to exit by itself, then SIGTERM, then SIGKILL.
end_pid() {
    local pid signal
    pid=$(cat "$1" 2>/dev/null) || return 0
    for signal in TERM KILL; do
        for _ in $(seq $(($2 * 10))); do kill -0 "$pid" 2>/dev/null || break 2; sleep 0.1; done
        kill -s "$signal" "$pid" 2>/dev/null || true
        set -- "$1" 5
    done
    rm -f "$1"
}

stop() {
    SLURM_CONF=$conf scontrol shutdown >/dev/null 2>&1 || true
    end_pid "$dir/slurmd.pid" 10
    end_pid "$dir/slurmctld.pid" 10
    end_pid "$dir/munged.pid" 0
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
