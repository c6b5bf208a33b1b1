# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source this file
#
# The environment of every script in examples/slurm/: sourced (never run) after the script has set
# REPO_DIR and, optionally, CONFIG. Every variable below has a default and can be set when
# submitting (sbatch passes the submitting shell's environment to the job), e.g.
#
#   MODEL=/shared/models/Qwen3-30B-A3B-Base DATA=/shared/data/dapo_math_17k.parquet \
#   RUN_ROOT=/shared/runs sbatch examples/slurm/vespo_n8.sbatch
#
# examples/slurm/README.md lists them all. Paths must be on a file system every node sees.

: "${REPO_DIR:?REPO_DIR must be set before sourcing env.sh}"

# --- inputs and outputs -------------------------------------------------------------------------
# CONFIG    trainer YAML (each script sets its own default)
# MODEL     Hugging Face checkpoint directory: the trainer loads it directly and SGLang serves it
# DATA      prompt parquet written by tools/prepare_data.py (columns prompt, answer)
# RUN_ROOT  parent of run directories; RUN_NAME defaults to the config's name, so resubmitting
#           the same script resumes the same run (run.resume = true) from its last checkpoint
# RUN_DIR   the run directory: checkpoints, metrics.jsonl, TensorBoard, logs, servers.json
: "${CONFIG:=$REPO_DIR/examples/configs/qwen3_30b_a3b_dapo_vespo_n8.yaml}"
: "${MODEL:=$REPO_DIR/models/Qwen3-30B-A3B-Base}"
: "${DATA:=$REPO_DIR/data/dapo_math_17k.parquet}"
: "${RUN_ROOT:=$REPO_DIR/runs}"
: "${RUN_NAME:=$(basename "$CONFIG" .yaml)}"
: "${RUN_DIR:=$RUN_ROOT/$RUN_NAME}"
: "${WANDB_PROJECT:=}"       # set to log to Weights & Biases too (run.wandb_project); needs WANDB_API_KEY
: "${TRAIN_OVERRIDES:=}"     # extra section.key=value overrides for the trainer, space separated

# --- cluster shape --------------------------------------------------------------------------------
# GPUS_PER_NODE  GPUs of every node (training processes per training node); 0 on a CPU-only
#                cluster (a rehearsal): steps then ask for no GPUs and each training node runs one
#                process; submit with `sbatch --gpus-per-node=0` to override the scripts' header
# TRAIN_NODES    the first TRAIN_NODES nodes of the job train; the rest serve rollouts
#                (ROLLOUT_NODES, default: all the others)
: "${GPUS_PER_NODE:=8}"
: "${TRAIN_NODES:=4}"
: "${ROLLOUT_NODES:=}"
# training processes per training node: one per GPU, or one on a CPU-only node
if ((GPUS_PER_NODE > 0)); then TRAIN_PROCS_PER_NODE=$GPUS_PER_NODE; else TRAIN_PROCS_PER_NODE=1; fi

# --- rollout servers (megatron-vespo sglang launch) ------------------------------------------------
# ROLLOUT_ENGINE           sglang (SGLang servers) | local (the project's CPU engine, same HTTP
#                          protocol: rehearse a job without GPUs, tools/slurm_localhost.sh)
# ROLLOUT_TP / ROLLOUT_EP  SGLang tensor / expert parallel size of each server (EP divides TP;
#                          a server uses ROLLOUT_TP GPUs, GPUS_PER_NODE / ROLLOUT_TP per node)
# ROLLOUT_MEM_FRACTION     --mem-fraction-static (empty: SGLang's default)
# ROLLOUT_EXTRA_ARGS       appended to every SGLang server command, e.g. "--disable-radix-cache"
# ROUTING_REPLAY           none | r2 | r3 -> algorithm.routing_replay; r3 also starts the servers
#                          with --enable-return-routed-experts and sends those requests to the
#                          servers directly (sglang-router 0.3.2 drops return_routed_experts)
# SGLANG_PYTHON            interpreter with SGLang installed (default: the launcher's own; with a
#                          container, /opt/sglang/bin/sglang-python: docker/Dockerfile keeps SGLang
#                          in an environment of its own)
# SERVER_WAIT_S            how long to wait for every server and the router to be healthy
# POLL_S                   seconds between the scripts' checks of servers.json and of their steps
# STOP_GRACE_S             seconds between SIGTERM and SIGKILL when the script stops a step
# TRAIN_STOP_S             on SIGTERM (scancel, the time limit's --signal=B:TERM@300) the trainer is
#                          asked to stop: it finishes its rollout batch, writes a checkpoint and
#                          exits; after TRAIN_STOP_S seconds it gets SIGTERM, STOP_GRACE_S later SIGKILL
: "${ROLLOUT_ENGINE:=sglang}"
: "${ROLLOUT_TP:=4}"
: "${ROLLOUT_EP:=1}"
: "${ROLLOUT_MEM_FRACTION:=}"
: "${ROLLOUT_EXTRA_ARGS:=}"
: "${ROUTING_REPLAY:=none}"
: "${SGLANG_PYTHON:=}"
: "${SERVER_WAIT_S:=3600}"
: "${POLL_S:=10}"            # how often the scripts look at servers.json and at their steps
: "${STOP_GRACE_S:=60}"      # SIGTERM -> SIGKILL grace when stopping the trainer or the servers
: "${TRAIN_STOP_S:=240}"     # a stop request -> SIGTERM, for the trainer (below --signal's 300 s)
STOP_FILE=$RUN_DIR/STOP      # the trainer watches this file (megatron_vespo/train/stop.py)

# --- ports ---------------------------------------------------------------------------------------
# SERVER_PORT     HTTP port of server i: SERVER_PORT + i (SGLang also opens internal ports of its own)
# ROUTER_PORT     the sglang-router, on the first rollout node (plus a free port for its metrics)
# DIST_INIT_PORT  rendezvous of SGLang servers that span nodes (ROLLOUT_TP > GPUS_PER_NODE)
# MASTER_PORT     torchrun's c10d rendezvous on the first training node
# The weight-sync NCCL group (training rank 0 + every server GPU) uses a free port on training
# rank 0, chosen at run time: rollout nodes must reach the training nodes on any port.
: "${SERVER_PORT:=30000}"
: "${ROUTER_PORT:=29900}"
: "${DIST_INIT_PORT:=25000}"
: "${MASTER_PORT:=29500}"

# --- API key ---------------------------------------------------------------------------------------
# Every SGLang server and the router require it as a Bearer token. Read from API_KEY_FILE; when
# the file does not exist a random key is written there (mode 600). The key is passed on command
# lines (SGLang's own --api-key, and rollout.api_key to the trainer): it is visible in `ps` on the
# job's nodes; it keeps other jobs and users on the network out, not users of the same nodes.
: "${API_KEY_FILE:=$RUN_DIR/api_key}"
: "${STATE_FILE:=$RUN_DIR/servers.json}"   # written by the launcher once everything is healthy

# --- software ---------------------------------------------------------------------------------------
# PYTHON          interpreter with megatron_vespo (and torch, megatron-core) inside the job's
#                 environment (the container when CONTAINER_IMAGE is set)
# HOST_PYTHON     python3 on the batch host, stdlib only (reads servers.json, makes the API key)
# MEGATRON_VESPO  the megatron-vespo command (inside the job's environment)
# TORCHRUN        the torchrun command (inside the job's environment)
# CONTAINER_IMAGE optional: run every step in this image with pyxis/enroot (srun --container-image),
#                 e.g. an .sqsh from `enroot import` of docker/Dockerfile's image
# APPTAINER_SIF   optional, instead: run every step with `$APPTAINER exec --nv` in this .sif
# APPTAINER       the Apptainer command (apptainer; `singularity` on older sites)
# APPTAINER_EXTRA_ARGS extra `apptainer exec` options, space separated (e.g. "--writable-tmpfs";
#                 not --cleanenv: the steps need the SLURM_* and exported variables)
# CONTAINER_MOUNTS what the container sees of the host: srun --container-mounts (pyxis) or
#                 apptainer --bind, same src:dst[,src:dst] syntax; must cover REPO_DIR, MODEL, DATA
#                 and RUN_ROOT; the default mounts REPO_DIR only
# SRUN_EXTRA_ARGS extra srun options for every step, space separated (e.g. "--mpi=none")
# DRY_RUN=1       print the commands instead of running them (no SLURM needed; servers.json faked)
# CHECK_CONFIG=0  skip the config check (examples/slurm/check_config.py) before starting
: "${PYTHON:=python3}"
: "${HOST_PYTHON:=python3}"
: "${MEGATRON_VESPO:=megatron-vespo}"
: "${TORCHRUN:=torchrun}"
: "${CONTAINER_IMAGE:=}"
: "${APPTAINER_SIF:=}"
: "${APPTAINER:=apptainer}"
: "${APPTAINER_EXTRA_ARGS:=}"
: "${CONTAINER_MOUNTS:=$REPO_DIR:$REPO_DIR}"
: "${SRUN_EXTRA_ARGS:=}"
: "${DRY_RUN:=0}"
: "${CHECK_CONFIG:=1}"

# --- process environment ------------------------------------------------------------------------------
# Exported: srun passes the batch script's environment to every step (and into the container).
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"   # megatron_vespo without pip install
export PYTHONUNBUFFERED=1
export HF_HOME="${HF_HOME:-$REPO_DIR/.cache/huggingface}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"               # compute nodes read local files only
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# Megatron-Core orders TP communication and compute on one CUDA stream per device.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# MoE token counts vary step to step: expandable segments keep fragmentation down.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # fail, do not hang
# Network interfaces: set these when the default route is not the fast fabric, e.g.
# NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0 (gloo carries the CPU groups), NCCL_IB_HCA=mlx5.
for _var in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_GID_INDEX; do
  if [[ -n ${!_var:-} ]]; then export "${_var?}"; fi
done
unset _var

# --- helpers ------------------------------------------------------------------------------------------

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

# run CMD...: run it, or under DRY_RUN=1 print it (one line, shell-quoted, prefixed "DRY-RUN:",
# the API key shown as <api-key>).
run() {
  if [[ $DRY_RUN == 1 ]]; then
    local arg
    printf 'DRY-RUN:'
    for arg in "$@"; do
      if [[ -n ${API_KEY:-} ]]; then
        arg=${arg//"$API_KEY"/<api-key>}
      fi
      printf ' %q' "$arg"
    done
    printf '\n'
  else
    "$@"
  fi
}

# start_bg CMD...: run it in the background, its pid in BG_PID (0 under DRY_RUN=1, which prints it).
BG_PID=0
start_bg() {
  if [[ $DRY_RUN == 1 ]]; then
    run "$@"
    BG_PID=0
  else
    "$@" &
    BG_PID=$!
  fi
}

# alive PID: whether a background process is still running (always false for DRY_RUN's 0).
alive() { [[ $1 != 0 ]] && kill -0 "$1" 2>/dev/null; }

# wait_gone PID SECONDS: wait until PID has exited or SECONDS have passed.
wait_gone() {
  local deadline=$((SECONDS + $2))
  while alive "$1" && ((SECONDS < deadline)); do
    sleep 0.2
  done
}

# step_id NAME: the JOBID.STEPID of this job's running step named NAME (srun --job-name=NAME),
# empty when there is none or no SLURM.
step_id() {
  [[ -n ${SLURM_JOB_ID:-} ]] && command -v squeue >/dev/null 2>&1 || return 0
  squeue --steps --jobs="$SLURM_JOB_ID" --noheader --format='%i %j' 2>/dev/null |
    awk -v name="$1" '$2 == name {print $1; exit}'
}

# stop_bg PID [NAME]: stop a background process: SIGTERM, SIGKILL after STOP_GRACE_S. When it is
# an srun step named NAME, the signal goes to the step's tasks through `scancel --signal=TERM
# JOBID.STEPID`: SIGTERM to srun itself makes srun SIGKILL its tasks at once (SLURM 22.05 "forcing
# job termination"), so nothing could shut down cleanly.
stop_bg() {
  local pid=$1 name=${2:-process} step out
  alive "$pid" || return 0
  step=$(step_id "$name")
  if [[ -n $step ]]; then
    log "stopping $name (step $step): SIGTERM to its tasks, SIGKILL after $STOP_GRACE_S s"
    # SLURM 22.05 asks every node of the job, and those without the step answer "Invalid job id
    # specified" although the step's own nodes delivered the signal: the exit status means nothing
    # here, and SIGTERM to srun would kill the tasks; a step that stays gets SIGKILL below.
    out=$(scancel --signal=TERM "$step" 2>&1) || true
    if [[ -n $out && $out != *"Invalid job id specified"* ]]; then
      log "scancel --signal=TERM $step: $out"
    fi
  else
    log "stopping $name (pid $pid): SIGTERM, SIGKILL after $STOP_GRACE_S s"
    kill -TERM "$pid" 2>/dev/null || true
  fi
  wait_gone "$pid" "$STOP_GRACE_S"
  if alive "$pid"; then
    log "$name did not stop in $STOP_GRACE_S s: SIGKILL"
    if [[ -n $step ]]; then scancel --signal=KILL "$step" 2>/dev/null || true; fi
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# stop_trainer: ask the trainer to stop (STOP_FILE: it ends its rollout batch, writes a checkpoint
# and exits), then stop_bg after TRAIN_STOP_S.
stop_trainer() {
  alive "$TRAIN_PID" || return 0
  log "asking the trainer to checkpoint and stop ($STOP_FILE; up to $TRAIN_STOP_S s)"
  : >"$STOP_FILE"
  wait_gone "$TRAIN_PID" "$TRAIN_STOP_S"
  stop_bg "$TRAIN_PID" "$TRAIN_STEP"
}

# yaml_quote VALUE: VALUE as a single-quoted YAML string, so that overrides such as an API key of
# digits or a path named "yes" stay strings (the trainer reads override values as YAML).
yaml_quote() {
  local q="'"
  printf "'%s'" "${1//$q/$q$q}"
}

# expand_hosts HOSTLIST: one host name per line: scontrol's, or the launcher's parser where no
# scontrol answers (no SLURM, or an scontrol installed without a cluster config).
expand_hosts() {
  if command -v scontrol >/dev/null 2>&1 && scontrol show hostnames "$1" 2>/dev/null; then
    return 0
  fi
  "$PYTHON" -c 'import sys
from megatron_vespo.rollout.launch import expand_hostlist
print("\n".join(expand_hostlist(sys.argv[1])))' "$1"
}

# SRUN_COMMON: the srun options every step shares (container image and mounts, SRUN_EXTRA_ARGS).
SRUN_COMMON=()
if [[ -n $CONTAINER_IMAGE ]]; then
  SRUN_COMMON+=("--container-image=$CONTAINER_IMAGE" "--container-workdir=$REPO_DIR")
  if [[ -n $CONTAINER_MOUNTS ]]; then
    SRUN_COMMON+=("--container-mounts=$CONTAINER_MOUNTS")
  fi
fi
if [[ -n $SRUN_EXTRA_ARGS ]]; then
  read -r -a _extra <<<"$SRUN_EXTRA_ARGS"
  SRUN_COMMON+=("${_extra[@]}")
  unset _extra
fi

# CONTAINER_EXEC: the words that run a command in the Apptainer image (APPTAINER_SIF), placed right
# before every step's command (after srun and its options); empty without Apptainer. pyxis needs
# none: its image and mounts are srun options (SRUN_COMMON).
CONTAINER_EXEC=()
if [[ -n $APPTAINER_SIF ]]; then
  [[ -z $CONTAINER_IMAGE ]] || die "set CONTAINER_IMAGE (pyxis) or APPTAINER_SIF (Apptainer), not both"
  CONTAINER_EXEC=("$APPTAINER" exec --nv --pwd "$REPO_DIR")
  if [[ -n $CONTAINER_MOUNTS ]]; then
    CONTAINER_EXEC+=(--bind "$CONTAINER_MOUNTS")
  fi
  if [[ -n $APPTAINER_EXTRA_ARGS ]]; then
    read -r -a _extra <<<"$APPTAINER_EXTRA_ARGS"
    CONTAINER_EXEC+=("${_extra[@]}")
    unset _extra
  fi
  CONTAINER_EXEC+=("$APPTAINER_SIF")
fi
# In docker/Dockerfile's image SGLang has a Python of its own (its torch and transformers pins
# clash with the trainer's); the launcher runs the servers with it.
if [[ -n $CONTAINER_IMAGE || -n $APPTAINER_SIF ]] && [[ -z $SGLANG_PYTHON ]]; then
  SGLANG_PYTHON=/opt/sglang/bin/sglang-python
fi

# load_api_key: API_KEY from API_KEY_FILE, creating a random one (mode 600) when it is missing.
load_api_key() {
  if [[ ! -s $API_KEY_FILE ]]; then
    mkdir -p "$(dirname "$API_KEY_FILE")"
    (
      umask 077
      "$HOST_PYTHON" -c 'import secrets; print("vespo-" + secrets.token_hex(24))' >"$API_KEY_FILE"
    )
    log "wrote a new API key to $API_KEY_FILE"
  fi
  API_KEY=$(<"$API_KEY_FILE")
  [[ -n $API_KEY ]] || die "empty API key in $API_KEY_FILE"
}

# wait_for_state PID: wait until the launcher (background pid PID) has written STATE_FILE, then
# set ROUTER_URL and SERVER_URLS (comma separated) from it. Fails when PID exits first or after
# SERVER_WAIT_S seconds. Under DRY_RUN=1 it sets placeholder URLs instead.
wait_for_state() {
  local pid=$1 deadline=$((SECONDS + SERVER_WAIT_S))
  if [[ $DRY_RUN == 1 ]]; then
    ROUTER_URL="http://ROUTER-FROM-$(basename "$STATE_FILE"):$ROUTER_PORT"
    SERVER_URLS="http://SERVER0-FROM-$(basename "$STATE_FILE"):$SERVER_PORT,http://SERVER1-FROM-$(basename "$STATE_FILE"):$((SERVER_PORT + 1))"
    return 0
  fi
  log "waiting for the rollout servers and the router ($STATE_FILE, up to $SERVER_WAIT_S s)"
  until [[ -s $STATE_FILE ]]; do
    alive "$pid" || die "the rollout launcher exited before writing $STATE_FILE (see its log above)"
    ((SECONDS < deadline)) || die "no $STATE_FILE after $SERVER_WAIT_S s"
    sleep "$POLL_S"
  done
  local lines
  lines=$("$HOST_PYTHON" -c 'import json, sys
state = json.load(open(sys.argv[1]))
urls = state.get("server_urls") or []
if not urls:
    sys.exit("no server_urls in " + sys.argv[1])
print(state.get("router_url") or "")
print(",".join(urls))' "$STATE_FILE") || die "cannot read $STATE_FILE"
  ROUTER_URL=${lines%%$'\n'*}
  SERVER_URLS=${lines#*$'\n'}
  log "router: ${ROUTER_URL:-none}; servers: $SERVER_URLS"
}

# check_config NODES GPUS OVERRIDE...: examples/slurm/check_config.py for NODES x GPUS training
# processes, with the overrides the trainer will get (URLs get placeholders: not known yet).
check_config() {
  local nodes=$1 gpus=$2
  shift 2
  if [[ $CHECK_CONFIG != 1 ]]; then
    log "CHECK_CONFIG=$CHECK_CONFIG: config check skipped"
    return 0
  fi
  local cmd=("$PYTHON" "$REPO_DIR/examples/slurm/check_config.py" --config "$CONFIG" --nodes "$nodes"
    --gpus-per-node "$gpus" --placeholder-urls "$@")
  if [[ -n $CONTAINER_IMAGE && -n ${SLURM_JOB_ID:-} && $DRY_RUN != 1 ]]; then
    # the batch host is outside the container: run the check as a one-task step inside it
    cmd=(srun --nodes=1 --ntasks=1 --overlap "${SRUN_COMMON[@]}" "${cmd[@]}")
  elif [[ -n $APPTAINER_SIF && $DRY_RUN != 1 ]]; then
    cmd=("${CONTAINER_EXEC[@]}" "${cmd[@]}")
  fi
  "${cmd[@]}" || die "the config does not fit this job (fix it before any GPU starts)"
}

# trainer_overrides: the section.key=value overrides every script gives the trainer, in the
# TRAINER_OVERRIDES array (ROUTER_URL and SERVER_URLS must be set).
trainer_overrides() {
  TRAINER_OVERRIDES=(
    "model.hf_dir=$(yaml_quote "$MODEL")"
    "data.prompts_file=$(yaml_quote "$DATA")"
    "run.run_dir=$(yaml_quote "$RUN_DIR")"
    "rollout.router_url=$(yaml_quote "$ROUTER_URL")"
    "rollout.server_urls=$(yaml_quote "$SERVER_URLS")"
    "rollout.api_key=$(yaml_quote "$API_KEY")"
    "algorithm.routing_replay=$ROUTING_REPLAY"
  )
  if [[ -n $WANDB_PROJECT ]]; then
    TRAINER_OVERRIDES+=("run.wandb_project=$(yaml_quote "$WANDB_PROJECT")")
  fi
  if [[ -n $TRAIN_OVERRIDES ]]; then
    local extra
    read -r -a extra <<<"$TRAIN_OVERRIDES"
    TRAINER_OVERRIDES+=("${extra[@]}")
  fi
}

# launch_args: the options of `megatron-vespo sglang launch` shared by the scripts, in LAUNCH_ARGS.
launch_args() {
  case $ROLLOUT_ENGINE in
    sglang | local) ;;
    *) die "ROLLOUT_ENGINE=$ROLLOUT_ENGINE: choose sglang or local" ;;
  esac
  LAUNCH_ARGS=(--engine "$ROLLOUT_ENGINE" --model "$MODEL" --tp-size "$ROLLOUT_TP" --ep-size "$ROLLOUT_EP"
    --api-key "$API_KEY" --state-file "$STATE_FILE" --log-dir "$RUN_DIR/rollout_logs"
    --port "$SERVER_PORT" --router-port "$ROUTER_PORT" --dist-init-port "$DIST_INIT_PORT"
    --health-timeout "$SERVER_WAIT_S")
  case $ROUTING_REPLAY in
    r3) LAUNCH_ARGS+=(--enable-return-routed-experts) ;;
    none | r2) ;;
    *) die "ROUTING_REPLAY=$ROUTING_REPLAY: choose none, r2 or r3" ;;
  esac
  if [[ -n $ROLLOUT_MEM_FRACTION ]]; then
    LAUNCH_ARGS+=(--mem-fraction-static "$ROLLOUT_MEM_FRACTION")
  fi
  if [[ -n $SGLANG_PYTHON ]]; then
    LAUNCH_ARGS+=(--server-python "$SGLANG_PYTHON")
  fi
  if [[ -n $ROLLOUT_EXTRA_ARGS ]]; then
    LAUNCH_ARGS+=("--extra-server-args=$ROLLOUT_EXTRA_ARGS")
  fi
}

# --- supervision ----------------------------------------------------------------------------------------
# install_traps: on exit (normal, error, SIGTERM from scancel or --signal, SIGINT) stop the trainer
# and the rollout servers (TRAIN_PID, ROLLOUT_PID) that are still running.
# The step names (srun --job-name) by which stop_bg finds the steps.
TRAIN_PID=0
ROLLOUT_PID=0
TRAIN_STEP=vespo-train
ROLLOUT_STEP=vespo-rollout
_cleanup() {
  local rc=$?
  trap - EXIT
  stop_trainer
  stop_bg "$ROLLOUT_PID" "$ROLLOUT_STEP"
  exit "$rc"
}
install_traps() {
  trap _cleanup EXIT
  trap 'log "SIGTERM: stopping"; exit 143' TERM
  trap 'log "SIGINT: stopping"; exit 130' INT
}

# supervise: wait for the trainer; if the rollout servers stop first, stop the trainer and fail.
# Exits with the trainer's exit code (the EXIT trap then stops the servers).
supervise() {
  local rc=0 rollout_rc=0
  while alive "$TRAIN_PID"; do
    if ! alive "$ROLLOUT_PID"; then
      wait "$ROLLOUT_PID" || rollout_rc=$?
      ROLLOUT_PID=0
      log "error: the rollout servers ($ROLLOUT_STEP) exited with code $rollout_rc during training: stopping the trainer (its last complete checkpoint is in $RUN_DIR/checkpoints)"
      stop_bg "$TRAIN_PID" "$TRAIN_STEP"
      TRAIN_PID=0
      exit 1
    fi
    sleep "$POLL_S"
  done
  wait "$TRAIN_PID" || rc=$?
  TRAIN_PID=0
  if ((rc != 0)) && ! alive "$ROLLOUT_PID"; then
    log "error: the rollout servers ($ROLLOUT_STEP) exited during training"
  fi
  log "training finished with exit code $rc"
  exit "$rc"
}
