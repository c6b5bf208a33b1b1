#!/usr/bin/env bash
# A real SLURM cluster on this machine: munged, slurmctld and K slurmd (nodes n1..nK), each slurmd
# with a hostname of its own and an address of its own (127.0.10.I). Rehearse a job here before
# spending cluster hours; the test suite uses it as a fixture (tests/test_slurm_cluster.py).
#
#   tools/slurm_localhost.sh install          apt-get install slurm-wlm munge (root, Debian/Ubuntu)
#   tools/slurm_localhost.sh start [DIR]      start the cluster (default DIR: $SLURM_LOCALHOST_DIR
#                                             or /tmp/megatron-vespo-slurm); prints the line to source
#   tools/slurm_localhost.sh status [DIR]     sinfo, and which daemons run
#   tools/slurm_localhost.sh stop [DIR]       stop every daemon by its PID file, release the namespace
#
# Then: source DIR/env.sh && sbatch --nodes=3 examples/slurm/vespo_n8.sbatch ...
#
# Needs root (namespaces, bind mount, daemons). Nothing outside DIR changes: the daemons run in a
# private mount namespace where a hosts file naming n1..nK is bind-mounted over /etc/hosts, and
# each slurmd in a UTS namespace of its own (its hostname). Addresses 127.0.10.I are loopback
# addresses Linux already routes: no interface or route is added. Jobs run as the submitting user
# inside those namespaces, so `hostname` on node I says nI and nI resolves there.
#
# Variables: SLURM_LOCALHOST_NODES (3), SLURM_LOCALHOST_CPUS (CPUs per node, default: this machine's),
# SLURM_LOCALHOST_GPUS (fake gpu gres per node, 8: empty files, so that --gpus-per-node is accepted),
# SLURM_LOCALHOST_PORT (first port, 16817: slurmctld; slurmd I at PORT + I),
# SLURM_LOCALHOST_NICE (niceness of the daemons, inherited by jobs, 0).
set -euo pipefail

cmd=${1:-}
DIR=${2:-${SLURM_LOCALHOST_DIR:-/tmp/megatron-vespo-slurm}}
NODES=${SLURM_LOCALHOST_NODES:-3}
CPUS=${SLURM_LOCALHOST_CPUS:-$(nproc)}
GPUS=${SLURM_LOCALHOST_GPUS:-8}
PORT=${SLURM_LOCALHOST_PORT:-16817}
NICE=${SLURM_LOCALHOST_NICE:-0}
CTL_ADDR=127.0.10.254

say() { printf 'slurm_localhost: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

node_addr() { printf '127.0.10.%d' "$1"; }

# missing: the programs this script needs that are not installed, space separated.
missing() {
  local name out=()
  for name in munged slurmctld slurmd sbatch scontrol unshare nsenter; do
    command -v "$name" >/dev/null 2>&1 || out+=("$name")
  done
  echo "${out[*]}"
}

install() {
  [[ -z $(missing) ]] && { say "slurm-wlm and munge are installed"; return 0; }
  [[ $(id -u) == 0 ]] || die "installing slurm-wlm and munge needs root (missing: $(missing))"
  command -v apt-get >/dev/null 2>&1 || die "no apt-get: install slurm-wlm and munge by hand (missing: $(missing))"
  say "installing slurm-wlm and munge (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  [[ -z $(missing) ]] || die "still missing after apt-get: $(missing)"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(<"$1")" 2>/dev/null; }

pid_files() {
  local i
  echo "$DIR/run/slurmctld.pid"
  for ((i = 1; i <= NODES; i++)); do echo "$DIR/run/slurmd-n$i.pid"; done
  echo "$DIR/munge/munged.pid"
}

write_config() {
  local i nodes_line=() host_lines=()
  mkdir -p "$DIR"/{run,log,state,dev}
  for ((i = 0; i < GPUS; i++)); do : >"$DIR/dev/gpu$i"; done
  for ((i = 1; i <= NODES; i++)); do
    mkdir -p "$DIR/spool/n$i"
    nodes_line+=("NodeName=n$i NodeHostname=n$i NodeAddr=$(node_addr "$i") Port=$((PORT + i)) CPUs=$CPUS${GPUS:+ Gres=gpu:$GPUS} State=UNKNOWN")
    host_lines+=("$(node_addr "$i") n$i")
  done
  {
    cat /etc/hosts
    echo "# megatron_vespo localhost SLURM cluster ($DIR)"
    echo "$CTL_ADDR ctl"
    printf '%s\n' "${host_lines[@]}"
  } >"$DIR/hosts"
  cat >"$DIR/slurm.conf" <<EOF
# written by tools/slurm_localhost.sh: a localhost cluster of $NODES nodes
ClusterName=vespo-localhost
SlurmctldHost=ctl($CTL_ADDR)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=300
${GPUS:+GresTypes=gpu}
$(printf '%s\n' "${nodes_line[@]}")
PartitionName=local Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP
EOF
  if ((GPUS > 0)); then
    echo "Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]" >"$DIR/gres.conf"
  else
    : >"$DIR/gres.conf"
  fi
  cat >"$DIR/env.sh" <<EOF
# source this file to use the localhost cluster ($DIR): sbatch, squeue, scancel, sinfo
export SLURM_CONF=$DIR/slurm.conf
EOF
}

# boot: run inside the private mount namespace; starts every daemon (each forks into the background).
boot() {
  mount --bind "$DIR/hosts" /etc/hosts
  export SLURM_CONF=$DIR/slurm.conf
  mkdir -p "$DIR/munge"
  chown munge: "$DIR/munge"
  chmod 711 "$DIR/munge"   # munged refuses a socket directory others cannot traverse
  runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
  unshare --uts sh -c 'hostname ctl && exec nice -n "$1" slurmctld -f "$2"' sh "$NICE" "$DIR/slurm.conf"
  local i
  for ((i = 1; i <= NODES; i++)); do
    unshare --uts sh -c 'hostname "$1" && exec nice -n "$2" slurmd -N "$1" -f "$3"' sh "n$i" "$NICE" "$DIR/slurm.conf"
  done
}

start() {
  [[ -z $(missing) ]] || die "not installed: $(missing) (tools/slurm_localhost.sh install, as root with apt)"
  [[ $(id -u) == 0 ]] || die "needs root: namespaces, a bind mount over /etc/hosts inside them, and the daemons"
  if pid_alive "$DIR/run/slurmctld.pid"; then
    die "a cluster already runs in $DIR (tools/slurm_localhost.sh stop $DIR)"
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR"
  write_config
  unshare --mount --propagation private "$0" _boot "$DIR"
  export SLURM_CONF=$DIR/slurm.conf
  local deadline=$((SECONDS + 60)) idle
  while ((SECONDS < deadline)); do
    idle=$(sinfo --noheader --states=idle --format=%D 2>/dev/null | awk '{s += $1} END {print s + 0}')
    if ((idle == NODES)); then
      say "$NODES nodes idle; use it with: source $DIR/env.sh"
      return 0
    fi
    sleep 0.2
  done
  say "the nodes did not become idle in 60 s:"
  sinfo --Node --long >&2 || true
  tail -n 20 "$DIR"/log/*.log >&2 || true
  stop
  exit 1
}

status() {
  local file
  for file in $(pid_files); do
    if pid_alive "$file"; then echo "running: $(basename "$file" .pid) (pid $(<"$file"))"; else echo "stopped: $(basename "$file" .pid)"; fi
  done
  if [[ -f $DIR/slurm.conf ]] && pid_alive "$DIR/run/slurmctld.pid"; then
    SLURM_CONF=$DIR/slurm.conf sinfo --Node --format='%N %T %c %G'
  fi
}

stop() {
  local file pid deadline
  [[ -d $DIR ]] || { say "nothing in $DIR"; return 0; }
  if [[ -f $DIR/slurm.conf ]] && pid_alive "$DIR/run/slurmctld.pid"; then
    # jobs first: their processes live in the namespaces too
    SLURM_CONF=$DIR/slurm.conf scancel --full --signal=KILL --state=RUNNING 2>/dev/null || true
    SLURM_CONF=$DIR/slurm.conf scancel --state=PENDING 2>/dev/null || true
  fi
  for file in $(pid_files); do
    pid_alive "$file" && kill -TERM "$(<"$file")" 2>/dev/null || true
  done
  deadline=$((SECONDS + 15))
  for file in $(pid_files); do
    while pid_alive "$file" && ((SECONDS < deadline)); do sleep 0.1; done
    if pid_alive "$file"; then
      pid=$(<"$file")
      say "$(basename "$file" .pid) (pid $pid) did not stop: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  say "stopped (logs in $DIR/log)"
}

case $cmd in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  _boot) boot ;;
  *) die "usage: $0 install | start [DIR] | status [DIR] | stop [DIR]" ;;
esac
