#!/usr/bin/env bash
# A one-node SLURM on this machine (slurmctld + slurmd + munge, Debian's packages) for the tests
# of the SLURM templates (tests/acceptance/test_slurm.py). Needs root; installs the packages with
# apt-get when they are missing.
#   bash scripts/local_slurm.sh start    # install if needed, configure, start, wait for the node
#   bash scripts/local_slurm.sh stop     # stop the daemons this script started
#   bash scripts/local_slurm.sh status   # exit 0 when the controller answers and the node is up
# The configuration is private: SLURM_CONF=$BAM_SLURM_DIR/slurm.conf (BAM_SLURM_DIR defaults to
# /var/tmp/bam-slurm); clients need that variable, e.g.
#   export SLURM_CONF=/var/tmp/bam-slurm/slurm.conf; sbatch --gpus-per-node=0 ...
# The node is this machine (CPUs = nproc), addressed as 127.0.0.1; the daemons' ports are
# SLURM_CTLD_PORT / SLURM_D_PORT (default 6817 / 6818; SLURM binds them on every interface); the
# partition is "debug".
# `stop` ends munged too when `start` started it.
# `start` exits 2, with the reason, where it cannot work by design (not root, no apt-get and no
# SLURM installed); 1 on a failure.
set -euo pipefail
DIR=${BAM_SLURM_DIR:-/var/tmp/bam-slurm}
CONF=$DIR/slurm.conf
CTLD_PORT=${SLURM_CTLD_PORT:-6817}
D_PORT=${SLURM_D_PORT:-6818}
export SLURM_CONF=$CONF

say() { echo "[slurm] $*" >&2; }
unavailable() { say "not started: $*"; exit 2; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || unavailable "slurmctld/slurmd/munge are not installed and installing them needs root"
  command -v apt-get >/dev/null || unavailable "slurmctld/slurmd/munge are not installed and there is no apt-get"
  say "installing slurmd slurmctld slurm-client munge (Debian packages) ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q -o Acquire::Retries=3 >&2
  apt-get install -y -q -o Acquire::Retries=3 --no-install-recommends slurmd slurmctld slurm-client munge >&2
}

munge_up() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  munge_up && return 0
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 700 /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  runuser -u munge -- munged
  touch "$DIR/munged.ours"
  for _ in $(seq 50); do munge_up && return 0; sleep 0.2; done
  say "munged did not answer"; return 1
}

write_conf() {
  local host mem
  host=$(hostname -s)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat > "$CONF" <<EOF
# one-node SLURM written by scripts/local_slurm.sh
ClusterName=bam-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# job credentials live 10 s (default 120): SLURM holds a requeued job that long before it starts
# it again, and launches here take well under a second
AuthInfo=cred_expire=10
CredType=cred/munge
# look at pending jobs every 2 s (default 60): a requeued job starts once it may
SchedulerParameters=sched_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_up() { sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

start() {
  install_packages
  [ "$(id -u)" = 0 ] || unavailable "starting slurmctld/slurmd needs root"
  mkdir -p "$DIR"
  start_munge
  write_conf
  running "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
  running "$DIR/slurmd.pid" || slurmd -f "$CONF"
  for _ in $(seq 150); do
    if node_up; then say "running: export SLURM_CONF=$CONF  ($(sinfo -h -o '%P %D %T %c CPUs'))"; return 0; fi
    sleep 0.2
  done
  say "the node did not come up:"; sinfo -N -l >&2 || true
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  return 1
}

stop() {
  local pidfile pid
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" /run/munge/munged.pid; do
    [ "$pidfile" != /run/munge/munged.pid ] || [ -f "$DIR/munged.ours" ] || continue
    running "$pidfile" || continue
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  rm -f "$DIR/munged.ours"
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) [ -f "$CONF" ] && node_up ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
