#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (slurmctld + slurmd + munge), for trying
# slurm/dist-train.sbatch without a real cluster and for the Slurm test in CI.
#
#   sudo slurm/local-cluster.sh start   # needs Debian's slurm-wlm and munge installed, and root
#   sudo slurm/local-cluster.sh stop
#
# It writes /etc/slurm/slurm.conf (the node is this host, 127.0.0.1, with all its CPUs and
# memory), creates a munge key if there is none, and starts the daemons without systemd, so it
# also works in containers. Process tracking is linuxproc (no cgroups needed).
set -euo pipefail

action=${1:-start}
conf=/etc/slurm/slurm.conf
node=$(hostname -s)

die() { echo "local-cluster: $*" >&2; exit 1; }

stop() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    pkill -x munged 2>/dev/null || true
    sleep 1
}

start() {
    [[ $(id -u) == 0 ]] || die "run as root (it writes /etc/slurm and starts daemons)"
    for b in slurmctld slurmd munged sbatch; do
        command -v "$b" >/dev/null || die "$b not found: apt-get install -y slurm-wlm munge"
    done
    stop
    cpus=$(nproc)
    # Leave 512 MiB to the system; Slurm refuses a node that reports less than configured.
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
    mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/munge /etc/munge
    cat >"$conf" <<EOF
# Written by dist_train's slurm/local-cluster.sh: one node, this host, loopback only.
ClusterName=local
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- munged --force
    slurmctld
    slurmd
    for _ in $(seq 60); do
        if sinfo -h -o '%t' 2>/dev/null | grep -qx 'idle'; then
            echo "local-cluster: node ${node} idle (${cpus} CPUs, ${mem_mb} MiB); try: sinfo; squeue"
            return 0
        fi
        sleep 1
    done
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    die "the node did not become idle within 60 s (logs above)"
}

case $action in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop" ;;
esac
