#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for tests and for trying the Slurm backend:
# munge, one slurmctld on a bridge, and N slurmd "nodes", each in its own network namespace
# with its own address, so a job's ranks really talk across a network.
#
#   scripts/local-cluster.sh up [--nodes N]   install what is missing (root, apt-get), start
#   scripts/local-cluster.sh status           sinfo and the daemons' pids
#   scripts/local-cluster.sh down             stop the daemons, remove namespaces and bridge
#   scripts/local-cluster.sh env              the line to eval for Slurm commands (SLURM_CONF)
#
# Exit codes: 0 done, 1 failed (the reason is printed), 2 usage, 3 this machine cannot host
# it (not root, no ip/nsenter, packages not installable): tests skip on 3 with its message.
# Facts behind the choices (Debian 12, Slurm 22.05): docs/slurm.md "The local test cluster".
set -euo pipefail

CLUSTER_DIR=${T5JA_CLUSTER_DIR:-/tmp/t5ja-slurm}
BRIDGE=t5br
SUBNET=10.231.0
CTLD_ADDR=$SUBNET.254
NODE_CPUS=${T5JA_CLUSTER_NODE_CPUS:-2}
NUM_NODES=2

die() { echo "local-cluster: $*" >&2; exit 1; }
cannot() { echo "local-cluster: this machine cannot host the cluster: $*" >&2; exit 3; }
export SLURM_CONF=$CLUSTER_DIR/slurm.conf

check_machine() {
    [ "$(id -u)" = 0 ] || cannot "needs root (network namespaces, munge, slurmd)"
    for tool in ip nsenter; do
        command -v "$tool" >/dev/null || cannot "\`$tool\` is missing (apt-get install iproute2 util-linux)"
    done
    ip netns list >/dev/null 2>&1 || cannot "\`ip netns\` does not work here"
}

install_packages() {
    local missing=()
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [ ${#missing[@]} = 0 ] && return 0
    command -v apt-get >/dev/null || cannot "no ${missing[*]} and no apt-get to install them"
    echo "local-cluster: installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        slurmctld slurmd slurm-client munge >"$CLUSTER_DIR/apt.log" 2>&1; } \
        || cannot "apt-get install failed: $(tail -n 3 "$CLUSTER_DIR/apt.log")"
}

start_network() {
    ip link show "$BRIDGE" >/dev/null 2>&1 || {
        ip link add "$BRIDGE" type bridge
        ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    }
    for i in $(seq 1 "$NUM_NODES"); do
        ip netns list | grep -qw "t5n$i" && continue
        ip netns add "t5n$i"
        ip link add "t5v$i" type veth peer name eth0 netns "t5n$i"
        ip link set "t5v$i" master "$BRIDGE" up
        ip -n "t5n$i" addr add "$SUBNET.$i/24" dev eth0
        ip -n "t5n$i" link set eth0 up
        ip -n "t5n$i" link set lo up
    done
}

start_munge() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged || die "munged did not start"
    munge -n | unmunge >/dev/null || die "munge does not authenticate (munge -n | unmunge)"
}

write_conf() {
    local host; host=$(hostname)
    mkdir -p "$CLUSTER_DIR/state"
    {
        echo "ClusterName=t5ja"
        echo "SlurmctldHost=$host($CTLD_ADDR)"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "StateSaveLocation=$CLUSTER_DIR/state"
        echo "SlurmdSpoolDir=$CLUSTER_DIR/spool-%n"
        echo "SlurmctldPidFile=$CLUSTER_DIR/slurmctld.pid"
        echo "SlurmdPidFile=$CLUSTER_DIR/slurmd-%n.pid"
        echo "SlurmctldLogFile=$CLUSTER_DIR/slurmctld.log"
        echo "SlurmdLogFile=$CLUSTER_DIR/slurmd-%n.log"
        # No cgroups in this container: track processes by parent pid, bind nothing.
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "MpiDefault=none"
        echo "ReturnToService=2"
        # Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued: the
        # trainer checkpoints in that window.
        echo "KillWait=60"
        # A requeued job may start again only after the launch credential expiry (cred_expire,
        # 120 s by default): short here so that preemption tests do not idle two minutes.
        echo "AuthInfo=cred_expire=10"
        # ... and then it is started by a scheduler pass, not by an event: the backfill one
        # every 30 s and the main one every 60 s by default. Every second or two here.
        echo "SchedulerParameters=bf_interval=1,sched_interval=2"
        for i in $(seq 1 "$NUM_NODES"); do
            mkdir -p "$CLUSTER_DIR/spool-n$i"
            echo "NodeName=n$i NodeAddr=$SUBNET.$i NodeHostname=$host CPUs=$NODE_CPUS RealMemory=8000 State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$SLURM_CONF"
}

start_daemons() {
    pid_alive "$CLUSTER_DIR/slurmctld.pid" || slurmctld || die "slurmctld did not start: $(tail -n 5 "$CLUSTER_DIR/slurmctld.log")"
    for i in $(seq 1 "$NUM_NODES"); do
        pid_alive "$CLUSTER_DIR/slurmd-n$i.pid" && continue
        # nsenter --net, not `ip netns exec`: that remounts /sys and slurmd then finds no cgroup mount.
        nsenter --net="/var/run/netns/t5n$i" slurmd -N "n$i" || die "slurmd n$i did not start: $(tail -n 5 "$CLUSTER_DIR/slurmd-n$i.log")"
    done
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_idle() {
    local idle
    for _ in $(seq 1 60); do
        idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
        [ "$idle" -ge "$NUM_NODES" ] && return 0
        sleep 0.5
    done
    die "nodes not idle after 30 s: $(sinfo -N 2>&1 | tr '\n' ' ')"
}

cmd_up() {
    check_machine
    mkdir -p "$CLUSTER_DIR"
    install_packages
    start_network
    start_munge
    # A conf from an earlier `up` with another node count would leave ghost nodes.
    write_conf
    start_daemons
    wait_idle
    echo "local-cluster: up, $NUM_NODES nodes ($SUBNET.1..$NUM_NODES), SLURM_CONF=$SLURM_CONF"
    sinfo
}

cmd_down() {
    for pid_file in "$CLUSTER_DIR"/slurmd-*.pid "$CLUSTER_DIR/slurmctld.pid"; do
        pid_alive "$pid_file" && kill "$(cat "$pid_file")"
    done
    for _ in $(seq 1 50); do
        local alive=0
        for pid_file in "$CLUSTER_DIR"/slurmd-*.pid "$CLUSTER_DIR/slurmctld.pid"; do
            pid_alive "$pid_file" && alive=1
        done
        [ $alive = 0 ] && break
        sleep 0.2
    done
    # Jobs' processes outlive slurmd under proctrack/linuxproc: kill what runs in the namespaces.
    for ns in $(ip netns list 2>/dev/null | awk '/^t5n[0-9]+/ {print $1}'); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns"
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    # Fresh state next time: no job ids or node states carried over.
    rm -rf "$CLUSTER_DIR/state" "$CLUSTER_DIR"/spool-n*
    echo "local-cluster: down"
}

cmd_status() {
    [ -f "$SLURM_CONF" ] || { echo "local-cluster: not set up ($SLURM_CONF missing)"; exit 1; }
    for pid_file in "$CLUSTER_DIR/slurmctld.pid" "$CLUSTER_DIR"/slurmd-*.pid; do
        if pid_alive "$pid_file"; then echo "$(basename "$pid_file" .pid): running (pid $(cat "$pid_file"))"
        else echo "$(basename "$pid_file" .pid): not running"; fi
    done
    sinfo
}

main() {
    local action=${1:-}
    [ $# -gt 0 ] && shift
    while [ $# -gt 0 ]; do
        case $1 in
            --nodes) NUM_NODES=${2:?--nodes needs a number}; shift 2 ;;
            *) echo "usage: $0 up [--nodes N] | down | status | env" >&2; exit 2 ;;
        esac
    done
    case $action in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        env) echo "export SLURM_CONF=$SLURM_CONF" ;;
        *) echo "usage: $0 up [--nodes N] | down | status | env" >&2; exit 2 ;;
    esac
}

main "$@"
