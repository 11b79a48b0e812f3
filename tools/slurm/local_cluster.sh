#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for `make test-slurm` and for trying the launch
# scripts by hand: installs Debian's slurm-wlm and munge when missing (apt-get, needs root), writes
# slurm.conf for localhost (this machine's hostname and CPU count) and a munge key, and runs
# munged, slurmctld and slurmd as root. Config, state and logs live in build/slurm/ (SLURM_DIR);
# nothing in /etc is written or read: clients find the config through SLURM_CONF.
#
#   bash tools/slurm/local_cluster.sh start          # then: export SLURM_CONF=$PWD/build/slurm/slurm.conf
#   bash tools/slurm/local_cluster.sh stop
#   bash tools/slurm/local_cluster.sh run CMD ARGS   # start, run CMD with SLURM_CONF set, stop; CMD's status
set -euo pipefail
cd "$(dirname "$0")/../.."

SLURM_DIR=${SLURM_DIR:-$PWD/build/slurm}
SLURMCTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
export SLURM_CONF=$SLURM_DIR/slurm.conf

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  echo "== installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
  mkdir -p "$SLURM_DIR"/{state,spool,log,munge}
  chmod 755 "$SLURM_DIR/munge"  # the socket is for every local user; the key stays 0400
  [ -f "$SLURM_DIR/munge/munge.key" ] || { dd if=/dev/urandom of="$SLURM_DIR/munge/munge.key" bs=1024 count=1 status=none; chmod 400 "$SLURM_DIR/munge/munge.key"; }
  local host cpus
  host=$(hostname -s)
  cpus=$(nproc)
  cat > "$SLURM_CONF" <<EOF
# Written by tools/slurm/local_cluster.sh: one node (this machine), one partition, root daemons.
ClusterName=m6local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SLURM_DIR/munge/munge.socket
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
# No cgroups (containers and VMs rarely delegate them): processes tracked by parent id.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  install_packages
  write_config
  if ! pid_alive "$SLURM_DIR/munged.pid"; then
    munged --key-file="$SLURM_DIR/munge/munge.key" --socket="$SLURM_DIR/munge/munge.socket" \
      --pid-file="$SLURM_DIR/munged.pid" --log-file="$SLURM_DIR/log/munged.log" \
      --seed-file="$SLURM_DIR/munge/munged.seed" --force
  fi
  pid_alive "$SLURM_DIR/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
  pid_alive "$SLURM_DIR/slurmd.pid" || slurmd -f "$SLURM_CONF"
  local deadline=$((SECONDS + 60)) state=""
  while [ $SECONDS -lt $deadline ]; do
    state=$(sinfo -h -N -o %T 2>/dev/null || true)
    if [ "$state" = idle ]; then
      echo "== local SLURM is up: node $(hostname -s) idle; export SLURM_CONF=$SLURM_CONF"
      return
    fi
    sleep 0.5
  done
  echo "error: the local SLURM node is not idle after 60 s (state: '${state:-no answer}'); logs in $SLURM_DIR/log" >&2
  tail -n 20 "$SLURM_DIR"/log/*.log >&2 || true
  exit 1
}

stop_daemon() {  # the daemon whose pid file is $1, by its pid; waits until it has gone
  local pidfile=$1 pid
  pid_alive "$pidfile" || return 0
  pid=$(cat "$pidfile")
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  stop_daemon "$SLURM_DIR/slurmd.pid"
  stop_daemon "$SLURM_DIR/slurmctld.pid"
  stop_daemon "$SLURM_DIR/munged.pid"
  echo "== local SLURM stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  run)
    shift
    start
    trap stop EXIT
    "$@"
    ;;
  *) echo "usage: $0 start | stop | run CMD [ARGS...]" >&2; exit 2 ;;
esac
