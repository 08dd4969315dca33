#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests and for trying the sbatch scripts.
#
#   bash scripts/local_slurm.sh start [DIR]   install slurm-wlm + munge if absent (apt-get), write a
#                                             one-node config into DIR, start munged, slurmctld
#                                             and slurmd; prints the line to source (SLURM_CONF)
#   bash scripts/local_slurm.sh stop [DIR]    cancel this cluster's jobs and stop exactly the
#                                             daemons that `start` recorded in DIR/*.pid
#   bash scripts/local_slurm.sh status [DIR]
#
# DIR defaults to $LOCAL_SLURM_DIR or /tmp/megatron_sphinx_slurm. Everything lives in DIR: the
# config, a private munge key and socket, state, spool, logs and pid files, with free TCP ports
# picked at start, so several clusters (or helpers) on one machine do not collide and nothing in
# /etc is touched. Clients find the cluster through SLURM_CONF=DIR/slurm.conf (DIR/env.sh).
# Needs root (slurmd starts jobs as their user; SlurmUser=root). Settings that work in a container
# without cgroups or systemd: ProctrackType=proctrack/pgid, TaskPlugin=task/none,
# SelectType=select/cons_tres (CR_Core), the node at 127.0.0.1 named after `hostname -s`.
# Variables: LOCAL_SLURM_CPUS (default: all CPUs, at least 2) CPUs of the node.
set -euo pipefail

cmd=${1:-}
DIR=${2:-${LOCAL_SLURM_DIR:-/tmp/megatron_sphinx_slurm}}
die() { echo "local_slurm: $*" >&2; exit 1; }

install_slurm() {
    # `srun --mpi=pmix` dlopens pmix2/lib/libpmix.so, which only libpmix-dev ships (slurm-wlm
    # depends on neither).
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null \
        && ls /usr/lib/*/pmix2/lib/libpmix.so >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null \
        || die "slurm-wlm is not installed and there is no apt-get:" \
               "install Debian/Ubuntu's slurm-wlm and munge"
    [ "$(id -u)" = 0 ] || die "slurm-wlm is not installed:" \
                              "run as root so apt-get can install slurm-wlm and munge"
    echo "local_slurm: installing slurm-wlm and munge with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends slurm-wlm munge libpmix-dev >"$DIR/apt.log" 2>&1; then
        apt-get update -q >>"$DIR/apt.log" 2>&1 || true
        apt-get install -y -q --no-install-recommends slurm-wlm munge libpmix-dev >>"$DIR/apt.log" 2>&1 \
            || die "apt-get install slurm-wlm munge libpmix-dev failed: see $DIR/apt.log"
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# pid recorded in DIR/NAME.pid, if that process is alive and still one of ours (its command line
# names DIR), else nothing.
our_pid() {
    local f="$DIR/$1.pid" pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    [ -r "/proc/$pid/cmdline" ] || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$DIR" && echo "$pid"
    return 0
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2; shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || die "$what did not come up within ${secs}s: see the logs in $DIR"
        sleep 0.5
    done
}

write_config() {
    local host cpus mem ctld_port slurmd_port
    host=$(hostname -s)
    # `nproc` alone honours OMP_NUM_THREADS; at least 2 CPUs so 2-task jobs fit (the configured
    # count is trusted: SlurmdParameters=config_overrides).
    cpus=${LOCAL_SLURM_CPUS:-$(nproc --all)}
    [ "$cpus" -ge 2 ] || cpus=2
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$DIR/slurm.conf" <<EOF
# Written by scripts/local_slurm.sh: a one-node test cluster (see that script).
ClusterName=local$(echo "$DIR" | cksum | cut -c1-6)
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${ctld_port}
SlurmdPort=${slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.sock,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=10
InactiveLimit=0
MinJobAge=600
MailProg=/bin/true
NodeName=${host} NodeAddr=127.0.0.1 NodeHostname=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    echo "export SLURM_CONF=$DIR/slurm.conf" >"$DIR/env.sh"
}

start() {
    [ "$(id -u)" = 0 ] || die "run as root (slurmd must start jobs; SlurmUser=root)"
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    if [ -n "$(our_pid slurmctld)" ]; then
        echo "local_slurm: already running in $DIR" >&2
        echo "export SLURM_CONF=$DIR/slurm.conf"
        return 0
    fi
    install_slurm
    write_config
    # A private munge key and socket: nothing in /etc/munge is used or changed.
    if [ ! -s "$DIR/munge.key" ]; then
        head -c 1024 /dev/urandom >"$DIR/munge.key"
        chmod 600 "$DIR/munge.key"
    fi
    munged -F --force --key-file="$DIR/munge.key" --socket="$DIR/munge.sock" \
        --pid-file="$DIR/munged.daemon.pid" --seed-file="$DIR/munge.seed" \
        --log-file="$DIR/log/munged.log" >>"$DIR/log/munged.log" 2>&1 &
    echo $! >"$DIR/munged.pid"
    wait_for 20 munged munge -n --socket="$DIR/munge.sock"
    export SLURM_CONF=$DIR/slurm.conf
    slurmctld -D -i -f "$DIR/slurm.conf" >>"$DIR/log/slurmctld.out" 2>&1 &
    echo $! >"$DIR/slurmctld.pid"
    wait_for 30 slurmctld scontrol ping
    slurmd -D -f "$DIR/slurm.conf" -N "$(hostname -s)" >>"$DIR/log/slurmd.out" 2>&1 &
    echo $! >"$DIR/slurmd.pid"
    wait_for 30 "slurmd (node idle)" node_idle
    echo "local_slurm: cluster up in $DIR ($(sinfo -h -o '%n %c CPUs %T'))" >&2
    echo "export SLURM_CONF=$DIR/slurm.conf"
}

node_idle() {
    sinfo -h -N -o '%T' | grep -qE '^(idle|mixed|allocated)'
}

stop() {
    [ -d "$DIR" ] || return 0
    DIR=$(cd "$DIR" && pwd)
    export SLURM_CONF=$DIR/slurm.conf
    local pid name
    if [ -n "$(our_pid slurmctld)" ]; then
        # Cancel this cluster's jobs so slurmd ends their processes before it stops.
        local jobs
        jobs=$(squeue -h -o '%i' 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 40); do
                [ -z "$(squeue -h -o '%i' 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    for name in slurmd slurmctld munged; do
        pid=$(our_pid "$name")
        [ -n "$pid" ] || { rm -f "$DIR/$name.pid"; continue; }
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        rm -f "$DIR/$name.pid"
    done
    echo "local_slurm: stopped the cluster in $DIR" >&2
}

status() {
    for name in munged slurmctld slurmd; do
        echo "$name: ${name:+$(our_pid "$name")}"
    done
    [ -f "$DIR/slurm.conf" ] && SLURM_CONF=$DIR/slurm.conf sinfo 2>&1 || true
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status [DIR]" ;;
esac
