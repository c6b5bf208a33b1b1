#!/bin/bash
# The SGLang environment's Python (installed as /opt/sglang/bin/sglang-python; SGLANG_PYTHON points
# here, and `megatron-vespo sglang launch --server-python` should too).
#
# The NGC base image puts its own torch's library directories on LD_LIBRARY_PATH
# (/usr/local/lib/python3.X/dist-packages/torch/lib, .../torch_tensorrt/lib). LD_LIBRARY_PATH wins
# over the RUNPATH of the PyPI torch that SGLang pins, so the SGLang environment would load the
# trainer's libtorch/libc10 next to its own Python bindings and crash. Drop every dist-packages
# entry (the system Python's site-packages) and keep the rest (CUDA forward-compat libraries,
# /usr/local/nvidia/lib64, ...). The image's pip constraints are for the trainer environment only.
set -euo pipefail

keep=()
IFS=: read -r -a entries <<<"${LD_LIBRARY_PATH:-}"
for entry in "${entries[@]}"; do
  case $entry in
    '' | */dist-packages/*) ;;
    *) keep+=("$entry") ;;
  esac
done
if ((${#keep[@]})); then
  LD_LIBRARY_PATH=$(
    IFS=:
    printf '%s' "${keep[*]}"
  )
  export LD_LIBRARY_PATH
else
  unset LD_LIBRARY_PATH
fi
unset PIP_CONSTRAINT

# the venv's python next to this script (the image installs it as /opt/sglang/bin/sglang-python)
exec "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/python" "$@"
