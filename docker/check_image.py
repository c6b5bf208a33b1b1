"""Check the two Python environments of the image (run with the trainer's Python, i.e. `python`).

    python /opt/megatron-vespo/docker/check_image.py --record --megatron-core 0.16.1 ...  # the build
    python /opt/megatron-vespo/docker/check_image.py --gpu      # in a container started with GPUs

--record writes the expected versions to /opt/megatron-vespo/versions.json; later runs read them.

Build mode reads installed metadata and imports only what loads without a GPU: the torch stack is
still the base image's (the constraints held), the pinned versions are the ones installed, every
requirement of megatron_vespo is met, apex's extensions load, and the SGLang environment has its
own torch (the version SGLang pins) and SGLang. GPU mode also runs a TransformerEngine layer and an
apex kernel on the GPU and imports SGLang's kernels.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys

from packaging.requirements import Requirement
from packaging.version import Version

CONSTRAINTS = "/etc/pip/constraint.txt"
MANIFEST = "/opt/megatron-vespo/versions.json"
SGLANG_PYTHON = os.environ.get("SGLANG_PYTHON", "/opt/sglang/bin/sglang-python")
APEX_MODULES = ("amp_C", "fused_layer_norm_cuda", "fused_weight_gradient_mlp_cuda")

FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        FAILURES.append(what)


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def constraint_pins() -> dict[str, str]:
    pins = {}
    if os.path.isfile(CONSTRAINTS):
        for line in open(CONSTRAINTS):
            text = line.split("#", 1)[0].strip()
            if "==" in text:
                name, _, pinned = text.partition("==")
                pins[name.strip().lower().replace("_", "-")] = pinned.strip()
    return pins


def check_trainer(expected: dict[str, str], apex: bool, gpu: bool) -> None:
    pins = constraint_pins()
    torch_version = version("torch")
    check(torch_version is not None and pins.get("torch") == torch_version,
          f"torch {torch_version} is the base image's build (constraint {pins.get('torch')})")
    for dist, wanted in expected.items():
        check(version(dist) == wanted, f"{dist} {version(dist)} == {wanted}")
    te_version = expected.get("transformer-engine")
    if te_version:  # the prebuilt core library of the matching CUDA major
        cores = {d: version(d) for d in ("transformer-engine-cu12", "transformer-engine-cu13") if version(d)}
        check(list(cores.values()) == [te_version], f"TransformerEngine core library {cores} == {te_version}")
    check(shutil.which("megatron-vespo") is not None, "the megatron-vespo command is on PATH")
    # every requirement of this package (and of its gpu extra) is met by what is installed
    for text in metadata.requires("megatron_vespo") or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": "gpu"}):
            continue
        have = version(req.name)
        check(have is not None and req.specifier.contains(Version(have), prereleases=True),
              f"megatron_vespo requires {req}: {have}")
    # import only what loads without a GPU driver during the build (megatron.core pulls in TE)
    for module in ("megatron_vespo", "sglang_router") + (("megatron.core",) if gpu else ()):
        try:
            importlib.import_module(module)
            check(True, f"import {module}")
        except Exception as err:  # noqa: BLE001 - report every failure, then exit non-zero
            check(False, f"import {module}: {err!r}")
    if apex:
        import torch  # noqa: F401  (the extensions need libtorch loaded first)

        for module in APEX_MODULES:
            try:
                importlib.import_module(module)
                check(True, f"apex extension {module}")
            except ImportError as err:
                check(False, f"apex extension {module}: {err}")
    if gpu:
        import torch
        import transformer_engine.pytorch as te

        check(torch.cuda.is_available(), f"trainer torch sees {torch.cuda.device_count()} GPU(s)")
        layer = te.Linear(256, 256, params_dtype=torch.bfloat16).cuda()
        out = layer(torch.randn(8, 256, device="cuda", dtype=torch.bfloat16))
        check(out.shape == (8, 256) and bool(torch.isfinite(out).all()), "TransformerEngine Linear on the GPU")
        if apex:
            from apex.normalization import FusedLayerNorm

            norm = FusedLayerNorm(256).cuda()
            check(bool(torch.isfinite(norm(torch.randn(8, 256, device="cuda"))).all()), "apex FusedLayerNorm")
        result = subprocess.run(["megatron-vespo", "--help"], capture_output=True, text=True)
        check(result.returncode == 0, "megatron-vespo --help" + ("" if result.returncode == 0 else
                                                                   f":\n{result.stderr[-2000:]}"))


SGLANG_PROBE = r"""
import importlib, importlib.metadata as md, json, sys
out = {"python": sys.executable}
for dist in ("sglang", "torch", "transformers", "sglang-kernel", "flashinfer-python"):
    try:
        out[dist] = md.version(dist)
    except md.PackageNotFoundError:
        out[dist] = None
out["requires"] = md.requires("sglang") or []
import torch
out["torch_file"] = torch.__file__
if "--gpu" in sys.argv:
    out["cuda"] = torch.cuda.is_available()
    for module in ("sglang.srt.server_args", "sgl_kernel", "flashinfer"):
        importlib.import_module(module)
    out["imports"] = True
print(json.dumps(out))
"""


def check_sglang(expected: str, gpu: bool) -> None:
    cmd = [SGLANG_PYTHON, "-c", SGLANG_PROBE] + (["--gpu"] if gpu else [])
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        check(False, f"the SGLang environment ({SGLANG_PYTHON}) runs:\n{result.stdout}{result.stderr}")
        return
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    check(probe["sglang"] == expected, f"sglang {probe['sglang']} == {expected} ({probe['python']})")
    for text in probe["requires"]:
        req = Requirement(text)
        if req.name in ("torch", "transformers") and req.marker is None:
            have = probe[req.name]
            check(have is not None and req.specifier.contains(Version(have), prereleases=True),
                  f"sglang requires {req}: {have}")
    trainer_torch = os.path.dirname(importlib.util.find_spec("torch").origin)
    check(os.path.dirname(probe["torch_file"]) != trainer_torch,
          f"the SGLang environment imports its own torch ({probe['torch_file']})")
    if gpu:
        check(probe.get("cuda") is True and probe.get("imports") is True,
              "SGLang's torch sees the GPUs; sglang, sgl_kernel and flashinfer import")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="also run kernels (needs GPUs)")
    parser.add_argument("--record", action="store_true", help=f"write the versions below to {MANIFEST}")
    parser.add_argument("--megatron-core")
    parser.add_argument("--transformer-engine")
    parser.add_argument("--sglang")
    parser.add_argument("--sglang-router")
    parser.add_argument("--no-apex", action="store_true", help="apex was not installed (APEX_BUILD=never)")
    args = parser.parse_args(argv)

    keys = ("megatron_core", "transformer_engine", "sglang", "sglang_router")
    if args.record:
        manifest = {key: getattr(args, key) for key in keys}
        manifest.update(apex=not args.no_apex, torch=version("torch"))
        os.makedirs(os.path.dirname(MANIFEST), exist_ok=True)
        with open(MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
    elif os.path.isfile(MANIFEST):
        with open(MANIFEST) as f:
            manifest = json.load(f)
    else:
        manifest = {key: getattr(args, key) for key in keys} | {"apex": not args.no_apex}
    te_version = manifest.get("transformer_engine")
    expected = {"megatron-core": manifest.get("megatron_core"), "transformer-engine": te_version,
                "transformer-engine-torch": te_version, "sglang-router": manifest.get("sglang_router")}
    check_trainer({k: v for k, v in expected.items() if v}, apex=manifest.get("apex", True), gpu=args.gpu)
    if manifest.get("sglang"):
        check_sglang(manifest["sglang"], args.gpu)
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
