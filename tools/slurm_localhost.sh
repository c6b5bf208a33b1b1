#!/usr/bin/env bash
# A real SLURM cluster on this machine: munged, slurmctld and K slurmd (nodes n1..nK), each node
# with a hostname, a network namespace and an address of its own (10.77.0.I on a bridge; slurmctld
# at 10.77.0.254), so that a job meets what it meets on a cluster: 127.0.0.1 of one node is not
# another's, and servers on two nodes may use the same port. Rehearse a job here before spending
# cluster hours; the test suite uses it as a fixture (tests/test_slurm_cluster.py).
#
#   tools/slurm_localhost.sh install          apt-get install slurm-wlm munge (root, Debian/Ubuntu)
#   tools/slurm_localhost.sh start [DIR]      start the cluster (default DIR: $SLURM_LOCALHOST_DIR
#                                             or /tmp/megatron-vespo-slurm)
#   tools/slurm_localhost.sh status [DIR]     which daemons run, and sinfo
#   tools/slurm_localhost.sh stop [DIR]       cancel the jobs, stop every daemon by its PID file,
#                                             remove the namespaces
#
# Then: source DIR/env.sh && sbatch --nodes=3 examples/slurm/vespo_n8.sbatch ...
# DIR/env.sh puts DIR/bin first on PATH: sbatch, squeue, scancel, sinfo, scontrol, srun that enter
# the cluster's namespaces (the machine's own network does not reach slurmctld).
#
# Needs root (namespaces, a bind mount, the daemons). Nothing of the machine changes: network
# namespaces (vespo-PORT-hub, vespo-PORT-nI) hold the bridge and the nodes' interfaces; the daemons
# run in a private mount namespace where a hosts file naming ctl and n1..nK is bind-mounted over
# /etc/hosts; each daemon has a UTS namespace of its own (its hostname). Jobs run as the submitting
# user inside their node's namespaces: `hostname` on node I says nI and every nJ resolves there.
#
# Variables: SLURM_LOCALHOST_NODES (3), SLURM_LOCALHOST_CPUS (CPUs per node, default: this
# machine's), SLURM_LOCALHOST_GPUS (a fake gpu gres per node backed by empty files, so that
# --gpus-per-node is accepted: 8), SLURM_LOCALHOST_PORT (slurmctld's port and the namespaces'
# names: 16817; slurmd listens on PORT + 1 in each node), SLURM_LOCALHOST_NICE (niceness of the
# daemons, inherited by jobs: 0).
set -euo pipefail

cmd=${1:-}
DIR=${2:-${SLURM_LOCALHOST_DIR:-/tmp/megatron-vespo-slurm}}
if [[ $cmd != start && -f $DIR/cluster.env ]]; then
  # shellcheck source=/dev/null
  source "$DIR/cluster.env"   # status and stop act on the cluster that start made there
fi
NODES=${SLURM_LOCALHOST_NODES:-3}
CPUS=${SLURM_LOCALHOST_CPUS:-$(nproc)}
GPUS=${SLURM_LOCALHOST_GPUS:-8}
PORT=${SLURM_LOCALHOST_PORT:-16817}
NICE=${SLURM_LOCALHOST_NICE:-0}
CTL_ADDR=10.77.0.254
NETNS=vespo-$PORT
# munged runs as the munge user, who must traverse every directory above its files: not DIR, which
# may sit under a private temporary directory (mode 700)
MUNGE_DIR=/run/vespo-munge-$PORT
CLIENTS=(sbatch squeue scancel sinfo scontrol srun salloc sacct)

say() { printf 'slurm_localhost: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

node_addr() { printf '10.77.0.%d' "$1"; }

# missing: the programs this script needs that are not installed, space separated.
missing() {
  local name out=()
  for name in munged slurmctld slurmd sbatch scontrol unshare nsenter ip runuser; do
    command -v "$name" >/dev/null 2>&1 || out+=("$name")
  done
  echo "${out[*]}"
}

install() {
  if [[ -z $(missing) ]]; then
    say "slurm-wlm and munge are installed"
    return 0
  fi
  [[ $(id -u) == 0 ]] || die "installing slurm-wlm and munge needs root (missing: $(missing))"
  command -v apt-get >/dev/null 2>&1 || die "no apt-get: install slurm-wlm and munge by hand (missing: $(missing))"
  say "installing slurm-wlm and munge (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge iproute2 >/dev/null
  [[ -z $(missing) ]] || die "still missing after apt-get: $(missing)"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(<"$1")" 2>/dev/null; }

pid_files() {
  local i
  echo "$DIR/run/slurmctld.pid"
  for ((i = 1; i <= NODES; i++)); do echo "$DIR/run/slurmd-n$i.pid"; done
  echo "$MUNGE_DIR/munged.pid"
}

write_config() {
  local i tool nodes_lines=() host_lines=()
  mkdir -p "$DIR"/{run,log,state,dev,bin}
  for ((i = 0; i < GPUS; i++)); do : >"$DIR/dev/gpu$i"; done
  for ((i = 1; i <= NODES; i++)); do
    mkdir -p "$DIR/spool/n$i"
    nodes_lines+=("NodeName=n$i NodeHostname=n$i NodeAddr=$(node_addr "$i") Port=$((PORT + 1)) CPUs=$CPUS$( ((GPUS > 0)) && echo " Gres=gpu:$GPUS") State=UNKNOWN")
    host_lines+=("$(node_addr "$i") n$i")
  done
  {
    cat /etc/hosts
    echo "# the localhost SLURM cluster in $DIR"
    echo "$CTL_ADDR ctl"
    printf '%s\n' "${host_lines[@]}"
  } >"$DIR/hosts"
  {
    echo "# written by tools/slurm_localhost.sh: a localhost cluster of $NODES nodes"
    echo "ClusterName=vespo-localhost"
    echo "SlurmctldHost=ctl($CTL_ADDR)"
    echo "SlurmctldPort=$PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "AuthInfo=socket=$MUNGE_DIR/munge.socket"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    # what this container supports: no cgroups, no accounting, no MPI
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "MpiDefault=none"
    echo "MailProg=/bin/true"
    echo "SchedulerType=sched/backfill"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "ReturnToService=2"
    echo "InactiveLimit=0"
    echo "KillWait=10"
    echo "MinJobAge=300"
    if ((GPUS > 0)); then echo "GresTypes=gpu"; fi
    printf '%s\n' "${nodes_lines[@]}"
    echo "PartitionName=local Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
  } >"$DIR/slurm.conf"
  if ((GPUS > 0)); then
    # empty files: slurmd logs "not a valid character or block device" and goes on; Count=
    # without File= makes the node INVAL
    echo "Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]" >"$DIR/gres.conf"
  else
    : >"$DIR/gres.conf"
  fi
  for tool in "${CLIENTS[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || continue
    {
      echo "#!/bin/sh"
      echo "# $tool of the localhost SLURM cluster in $DIR (tools/slurm_localhost.sh); inside the"
      echo "# cluster's namespaces (a job that inherited this PATH) the command itself"
      echo "if [ \"\$(readlink /proc/self/ns/net)\" != \"$(readlink /proc/self/ns/net)\" ]; then"
      echo "  exec $(command -v "$tool") \"\$@\""
      echo "fi"
      echo "exec nsenter --net=/run/netns/$NETNS-hub --mount=/proc/\$(cat $DIR/run/slurmctld.pid)/ns/mnt \\"
      echo "  --wd=\"\$PWD\" env SLURM_CONF=$DIR/slurm.conf $(command -v "$tool") \"\$@\""
    } >"$DIR/bin/$tool"
    chmod +x "$DIR/bin/$tool"
  done
  {
    echo "# source this file to use the localhost SLURM cluster in $DIR"
    echo "export SLURM_CONF=$DIR/slurm.conf"
    echo "export PATH=$DIR/bin:\$PATH"
  } >"$DIR/env.sh"
}

# network: a bridge in the hub namespace, one namespace per node with a veth on the bridge.
network() {
  local i
  ip netns add "$NETNS-hub"
  ip -n "$NETNS-hub" link set lo up
  ip -n "$NETNS-hub" link add br0 type bridge
  ip -n "$NETNS-hub" addr add "$CTL_ADDR/24" dev br0
  ip -n "$NETNS-hub" link set br0 up
  for ((i = 1; i <= NODES; i++)); do
    ip netns add "$NETNS-n$i"
    ip -n "$NETNS-n$i" link set lo up
    ip -n "$NETNS-hub" link add "v$i" type veth peer name eth0 netns "$NETNS-n$i"
    ip -n "$NETNS-hub" link set "v$i" master br0 up
    ip -n "$NETNS-n$i" addr add "$(node_addr "$i")/24" dev eth0
    ip -n "$NETNS-n$i" link set eth0 up
  done
}

remove_network() {
  local name
  for name in $(ip netns list 2>/dev/null | awk '{print $1}'); do
    case $name in
      "$NETNS"-hub | "$NETNS"-n[0-9]*) ip netns del "$name" 2>/dev/null || true ;;
    esac
  done
}

# boot: runs inside the private mount namespace; starts every daemon (each forks into the background
# and keeps the namespace alive).
boot() {
  mount --bind "$DIR/hosts" /etc/hosts
  rm -rf "$MUNGE_DIR"
  mkdir -p "$MUNGE_DIR"
  chown munge: "$MUNGE_DIR"
  chmod 711 "$MUNGE_DIR"   # munged refuses a socket directory others cannot traverse
  runuser -u munge -- munged --socket="$MUNGE_DIR/munge.socket" --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
  # `nsenter --net`, not `ip netns exec`: the latter remounts /sys, and slurmd then finds no cgroup fs
  # shellcheck disable=SC2016  # $1.. expand in the inner sh
  nsenter --net="/run/netns/$NETNS-hub" unshare --uts \
    sh -c 'hostname ctl && exec nice -n "$1" slurmctld -f "$2"' sh "$NICE" "$DIR/slurm.conf"
  local i
  for ((i = 1; i <= NODES; i++)); do
    # shellcheck disable=SC2016
    nsenter --net="/run/netns/$NETNS-n$i" unshare --uts \
      sh -c 'hostname "$1" && exec nice -n "$2" slurmd -N "$1" -f "$3"' sh "n$i" "$NICE" "$DIR/slurm.conf"
  done
}

start() {
  [[ -z $(missing) ]] || die "not installed: $(missing) (tools/slurm_localhost.sh install, as root with apt)"
  [[ $(id -u) == 0 ]] || die "needs root: network namespaces, a bind mount over /etc/hosts inside a mount namespace, the daemons"
  if pid_alive "$DIR/run/slurmctld.pid"; then
    die "a cluster already runs in $DIR (tools/slurm_localhost.sh stop $DIR)"
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR"
  printf 'SLURM_LOCALHOST_NODES=%s\nSLURM_LOCALHOST_PORT=%s\n' "$NODES" "$PORT" >"$DIR/cluster.env"
  write_config
  remove_network  # what a killed earlier cluster on this port may have left
  if ! network; then
    remove_network
    die "cannot create the network namespaces (needs CAP_NET_ADMIN, veth and bridge support)"
  fi
  if ! unshare --mount --propagation private "$(readlink -f "$0")" _boot "$DIR"; then
    say "a daemon did not start (logs in $DIR/log and $MUNGE_DIR)"
    stop
    exit 1
  fi
  local deadline=$((SECONDS + 60)) idle
  while ((SECONDS < deadline)); do
    idle=$("$DIR/bin/sinfo" --noheader --states=idle --format=%D 2>/dev/null | awk '{s += $1} END {print s + 0}')
    if ((idle == NODES)); then
      say "$NODES nodes idle; use it with: source $DIR/env.sh"
      return 0
    fi
    sleep 0.2
  done
  say "the nodes did not become idle in 60 s:"
  "$DIR/bin/sinfo" --Node --long >&2 || true
  tail -n 20 "$DIR"/log/*.log >&2 || true
  stop
  exit 1
}

status() {
  local file
  for file in $(pid_files); do
    if pid_alive "$file"; then
      echo "running: $(basename "$file" .pid) (pid $(<"$file"))"
    else
      echo "stopped: $(basename "$file" .pid)"
    fi
  done
  if pid_alive "$DIR/run/slurmctld.pid"; then
    "$DIR/bin/sinfo" --Node --format='%N %T %c %G'
  fi
}

stop() {
  local file pid deadline
  if pid_alive "$DIR/run/slurmctld.pid"; then
    # jobs first: their processes live in the namespaces too
    "$DIR/bin/scancel" --full --signal=KILL --state=RUNNING 2>/dev/null || true
    "$DIR/bin/scancel" --state=PENDING 2>/dev/null || true
  fi
  for file in $(pid_files); do
    if pid_alive "$file"; then kill -TERM "$(<"$file")" 2>/dev/null || true; fi
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
  remove_network
  if [[ -d $MUNGE_DIR ]]; then
    if [[ -d $DIR/log ]]; then cp "$MUNGE_DIR/munged.log" "$DIR/log/" 2>/dev/null || true; fi
    rm -rf "$MUNGE_DIR"
  fi
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
