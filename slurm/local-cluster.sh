#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (slurmctld + slurmd + munge), for trying
# slurm/dist-train.sbatch without a real cluster and for the Slurm test in CI.
#
#   sudo slurm/local-cluster.sh start       # needs Debian's slurm-wlm and munge installed, and root
#   sudo slurm/local-cluster.sh start 2     # two nodes: this host and a network namespace
#   sudo slurm/local-cluster.sh stop
#
# It writes /etc/slurm/slurm.conf, creates a munge key if there is none, and starts the daemons
# without systemd, so it also works in containers. Process tracking is linuxproc (no cgroups).
#
# One node: this host at 127.0.0.1 with all its CPUs and memory.
# N nodes: node 1 is this host at 10.77.0.1 on a bridge (dtbr0); nodes 2..N are network
# namespaces (dt-n2, ...) at 10.77.0.2..N, each with its own slurmd, so what crosses between
# nodes goes over a real (virtual) network with its own addresses, as between hosts. They share
# this host's CPUs (each node reports all of them) and split its memory; files are shared, like
# a cluster's shared file system, and so is /tmp (a per-node /tmp is the one thing missing).
set -euo pipefail

action=${1:-start}
nodes=${2:-1}
conf=/etc/slurm/slurm.conf
node=$(hostname -s)
subnet=10.77.0

die() { echo "local-cluster: $*" >&2; exit 1; }

stop() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    pkill -x munged 2>/dev/null || true
    sleep 1
    for ns in $(ip netns list 2>/dev/null | awk '/^dt-n[0-9]+/ {print $1}'); do ip netns del "$ns"; done
    ip link del dtbr0 2>/dev/null || true
}

# Nodes 2..N: a network namespace each, joined to this host by a bridge.
make_network() {
    ip link add dtbr0 type bridge
    ip addr add "$subnet.1/24" dev dtbr0
    ip link set dtbr0 up
    for i in $(seq 2 "$nodes"); do
        ip netns add "dt-n$i"
        ip link add "dtv$i" type veth peer name eth0 netns "dt-n$i"
        ip link set "dtv$i" master dtbr0
        ip link set "dtv$i" up
        ip netns exec "dt-n$i" ip addr add "$subnet.$i/24" dev eth0
        ip netns exec "dt-n$i" ip link set eth0 up
        ip netns exec "dt-n$i" ip link set lo up
    done
}

start() {
    [[ $(id -u) == 0 ]] || die "run as root (it writes /etc/slurm and starts daemons)"
    for b in slurmctld slurmd munged sbatch; do
        command -v "$b" >/dev/null || die "$b not found: apt-get install -y slurm-wlm munge"
    done
    [[ $nodes =~ ^[0-9]+$ ]] && ((nodes >= 1 && nodes <= 8)) || die "nodes must be 1 to 8, not '$nodes'"
    stop
    rm -rf /var/lib/slurm/slurmctld  # a fresh cluster: no drained nodes or jobs from an earlier start
    cpus=$(nproc)
    # Leave 512 MiB to the system; Slurm refuses a node that reports less than configured.
    mem_mb=$(( ($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512) / nodes ))
    addr=127.0.0.1
    names=$node
    # Each node also declares GPUS (default 2) GPUs backed by empty stand-in files: enough for
    # Slurm to account `--gpus-per-node` and set SLURM_GPUS_ON_NODE, with no GPU present.
    gres="Gres=gpu:${GPUS:-2}"
    node_lines="NodeName=${node} NodeAddr=${addr} CPUs=${cpus} RealMemory=${mem_mb} ${gres} State=UNKNOWN"
    if ((nodes > 1)); then
        command -v ip >/dev/null || die "ip not found: apt-get install -y iproute2"
        make_network
        addr=$subnet.1
        node_lines="NodeName=${node} NodeAddr=${addr} CPUs=${cpus} RealMemory=${mem_mb} ${gres} State=UNKNOWN"
        for i in $(seq 2 "$nodes"); do
            names="$names,${node}-n$i"
            node_lines+=$'\n'"NodeName=${node}-n$i NodeAddr=$subnet.$i CPUs=${cpus} RealMemory=${mem_mb} ${gres} State=UNKNOWN"
        done
    fi
    mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/log/slurm /run/munge /etc/munge
    cat >"$conf" <<EOF
# Written by dist_train's slurm/local-cluster.sh: one node, this host, loopback only.
ClusterName=local
SlurmctldHost=${node}(${addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd.%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
GresTypes=gpu
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
${node_lines}
PartitionName=debug Nodes=${names} Default=YES MaxTime=INFINITE State=UP
EOF
    # Stand-in device files: slurmd counts a GPU per file and sets CUDA_VISIBLE_DEVICES by index.
    mkdir -p /var/lib/slurm/fake-gpu
    for g in $(seq 0 $((${GPUS:-2} - 1))); do touch "/var/lib/slurm/fake-gpu/nvidia$g"; done
    printf 'AutoDetect=off\nName=gpu File=/var/lib/slurm/fake-gpu/nvidia[0-%d]\n' $((${GPUS:-2} - 1)) >/etc/slurm/gres.conf
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- munged --force
    for n in ${names//,/ }; do mkdir -p "/var/lib/slurm/slurmd.$n"; done
    slurmctld
    slurmd -N "$node"
    # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup tree slurmd looks for.
    for i in $(seq 2 "$nodes"); do nsenter --net="/run/netns/dt-n$i" slurmd -N "${node}-n$i"; done
    for _ in $(seq 60); do
        if [[ $(sinfo -h -N -o '%t' 2>/dev/null | grep -cx 'idle') == "$nodes" ]]; then
            echo "local-cluster: ${nodes} node(s) idle (${names}; ${cpus} CPUs, ${mem_mb} MiB each); try: sinfo; squeue"
            return 0
        fi
        sleep 1
    done
    tail -n 20 /var/log/slurm/*.log >&2 || true
    die "the nodes did not become idle within 60 s (logs above)"
}

case $action in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start [NODES]|stop" ;;
esac
