#!/usr/bin/env bash
# The GPU check (make gpu-check): the project's CUDA paths on one H100/H200, one table at the end.
#
#   tools/gpu_check.sh [--dry-run] [--no-install] [--wheels DIR] [--python PY] [--work DIR] [--only "CHECK ..."]
#
# Install: the package with its GPU extras (TransformerEngine) and, unless SGLANG_PYTHON names one
# already (the Docker image does), SGLang 0.5.23 in a venv of its own (.venv-sglang-gpu); with
# --wheels DIR, offline from the wheels in DIR (megatron-core, ...) on top of the machine's torch.
# Checks (tools/gpu_check.py, each a row of the table; a missing extra is a "skip" with the reason):
#   env       the GPU, CUDA, torch and the extras present
#   train     3 training steps on the GPU under NCCL, checkpoint read back on the CPU path
#   parity    the loss hook on the GPU against the fp64 reference (local spec; TE spec when installed)
#   trainer_path  the trainer's real sequence of calls on the GPU against the fp64 reference
#   logprobs  the log-prob path's throughput as a fraction of a device-to-device copy of the logits
#   te        TE-spec vs local-spec logits (needs TransformerEngine)
#   sglang    a real SGLang server on the GPU (needs SGLANG_PYTHON with sglang 0.5.23)
#   mismatch  the mismatch command, Megatron on the GPU
# Exit status: 0 when no check failed.
set -euo pipefail

cd "$(dirname "$0")/.."
DRY_RUN=0
NO_INSTALL=0
WHEELS=""
PYTHON="${PYTHON:-python3}"
WORK="runs/gpu_check"
CHECKS="env train parity trainer_path logprobs te sglang mismatch"
CHECK_TIMEOUT="${CHECK_TIMEOUT:-300}"

usage() {  # the comment block at the top of this file
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --no-install) NO_INSTALL=1 ;;
        --wheels) WHEELS="$2"; shift ;;
        --python) PYTHON="$2"; shift ;;
        --work) WORK="$2"; shift ;;
        --only) CHECKS="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

for check in $CHECKS; do
    case "$check" in
        env|train|parity|trainer_path|logprobs|te|sglang|mismatch) ;;
        *) echo "gpu_check.sh: unknown check '$check' (choose from: env train parity trainer_path logprobs te sglang mismatch)" >&2
           exit 2 ;;
    esac
done
WORK=$(realpath -m "$WORK")
SGLANG_VENV="$PWD/.venv-sglang-gpu"
if [ -n "$WHEELS" ] && ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: --wheels $WHEELS holds no .whl files" >&2
    exit 2
fi

install_commands() {
    if [ "$NO_INSTALL" = 1 ]; then  # a machine set up already (the Docker image)
        echo "export PYTHONPATH=$PWD\${PYTHONPATH:+:\$PYTHONPATH}"
    elif [ -n "$WHEELS" ]; then
        # offline: the wheels into a folder of their own, first on the path, the machine's torch kept
        echo "$PYTHON -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target $WORK/site $WHEELS/*.whl"
        echo "export PYTHONPATH=$WORK/site:$PWD\${PYTHONPATH:+:\$PYTHONPATH}"
    else
        echo "$PYTHON -m pip install --quiet -e .[gpu]"
        if [ -z "${SGLANG_PYTHON:-}" ]; then  # SGLang pins its own torch: a venv of its own
            echo "$PYTHON -m venv $SGLANG_VENV"
            echo "$SGLANG_VENV/bin/python -m pip install --quiet sglang==0.5.23 sglang-router==0.3.2"
            echo "export SGLANG_PYTHON=$SGLANG_VENV/bin/python"
        fi
    fi
}

if [ "$DRY_RUN" = 1 ]; then
    echo "plan (nothing is run):"
    install_commands | sed 's/^/  install: /'
    for check in $CHECKS; do
        echo "  check:   $PYTHON tools/gpu_check.py $check --work $WORK   (timeout ${CHECK_TIMEOUT} s)"
    done
    echo "  then:    one table of every check; exit 1 if any failed"
    exit 0
fi

mkdir -p "$WORK"
echo "== install"
while IFS= read -r command; do
    echo "\$ $command"
    eval "$command"
done < <(install_commands)

results="$WORK/results.jsonl"
: > "$results"
failed=0
for check in $CHECKS; do
    echo "== $check"
    start=$(date +%s)
    code=0
    limit="$CHECK_TIMEOUT"
    [ "$check" = sglang ] && limit=$(( CHECK_TIMEOUT * 3 ))  # a server start and three weight syncs
    timeout "$limit" "$PYTHON" tools/gpu_check.py "$check" --work "$WORK" >"$WORK/$check.out" \
        2>"$WORK/$check.log" || code=$?
    line=$(grep '^{"check"' "$WORK/$check.out" | tail -n 1 || true)
    if [ -z "$line" ]; then
        line=$(printf '{"check": "%s", "status": "fail", "detail": "exited %s after %s s without a result; see %s"}' \
            "$check" "$code" "$(( $(date +%s) - start ))" "$WORK/$check.log")
    fi
    echo "$line" | tee -a "$results"
    case "$line" in *'"status": "fail"'*) failed=1 ;; esac
done

echo
"$PYTHON" - "$results" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
width = max(len(r["check"]) for r in rows)
print(f"{'check':<{width}}  status  detail")
for r in rows:
    print(f"{r['check']:<{width}}  {r['status']:<6}  {r['detail']}")
EOF
exit "$failed"
