"""Make the SGLang environment use the same NCCL library as the trainer (run during the build).

The weight sync (``rollout.weight_sync: distributed``) puts training rank 0 and every SGLang GPU
into ONE NCCL communicator. NCCL refuses to build a communicator whose ranks run different NCCL
versions ("Mismatched NCCL version detected", ncclInvalidUsage), and the two environments of the
image bring different ones: the trainer's torch (the NGC build) links the image's system NCCL,
while the PyPI torch that SGLang pins loads the ``nvidia-nccl-cu13`` wheel it depends on. This
script replaces that wheel's ``libnccl.so.2`` with a symlink to the library the trainer's torch has
loaded (NCCL keeps its C API backward compatible, so the newer of the two serves both), then checks
that both interpreters report the same ``ncclGetVersion()``. No GPU is needed for any of it.

    python nccl_align.py --sglang-python /opt/sglang/bin/sglang-python        # align, then check
    python nccl_align.py --sglang-python /opt/sglang/bin/sglang-python --check  # check only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# Runs in either interpreter: the NCCL version torch reports and the libnccl file it has mapped.
PROBE = r"""
import json, os, torch
version = torch.cuda.nccl.version()
paths = set()
with open("/proc/self/maps") as maps:
    for line in maps:
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if "libnccl" in os.path.basename(path):
            paths.add(os.path.realpath(path))
print(json.dumps({"version": list(version) if isinstance(version, tuple) else version,
                  "paths": sorted(paths), "torch": torch.__version__, "torch_file": torch.__file__}))
"""

# Runs in the SGLang interpreter (before torch is imported): where the nvidia-nccl wheel's library is.
WHEEL_LIB = r"""
import importlib.metadata as md, json
found = []
for dist in ("nvidia-nccl-cu13", "nvidia-nccl-cu12"):
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError:
        continue
    found += [str(md.distribution(dist).locate_file(f)) for f in files if f.name == "libnccl.so.2"]
print(json.dumps(found))
"""


def run_python(python: str, code: str) -> dict | list:
    result = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{python} failed:\n{result.stdout}{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sglang-python", required=True, help="the SGLang environment's interpreter")
    parser.add_argument("--check", action="store_true", help="only compare the two NCCL versions")
    args = parser.parse_args(argv)

    trainer = run_python(sys.executable, PROBE)
    print(f"trainer: torch {trainer['torch']}, NCCL {trainer['version']}, {trainer['paths']}")
    if not args.check:
        if len(trainer["paths"]) != 1:
            print("nccl_align.py: the trainer's torch has no single shared libnccl mapped (statically "
                  "linked?): cannot share it with the SGLang environment", file=sys.stderr)
            return 1
        target = trainer["paths"][0]
        libs = run_python(args.sglang_python, WHEEL_LIB)
        if not libs:
            print("nccl_align.py: no nvidia-nccl wheel in the SGLang environment", file=sys.stderr)
            return 1
        for lib in libs:
            os.remove(lib)
            os.symlink(target, lib)
            print(f"linked {lib} -> {target}")
    sglang = run_python(args.sglang_python, PROBE)
    print(f"sglang:  torch {sglang['torch']}, NCCL {sglang['version']}, {sglang['paths']}")
    if sglang["version"] != trainer["version"]:
        print(f"nccl_align.py: NCCL differs (trainer {trainer['version']}, SGLang {sglang['version']}): "
              "the weight-sync communicator would fail to initialise", file=sys.stderr)
        return 1
    if os.path.dirname(sglang["torch_file"]) == os.path.dirname(trainer["torch_file"]):
        print("nccl_align.py: both interpreters import the same torch: the SGLang environment is not "
              "isolated", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
