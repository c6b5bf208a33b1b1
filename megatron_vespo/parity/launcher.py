"""``megatron-vespo parity``: launch one torchrun job per layout, gather reports, print a table."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from megatron_vespo.launcher import run_module, worker_environment
from megatron_vespo.losses import LossConfig
from megatron_vespo.mcore.parallel import Layout

WORKER = "megatron_vespo.parity.worker"


def _worker_arguments(layout: Layout, args, json_out: str) -> list[str]:
    cmd = [
        "--layout", str(layout),
        "--losses", args.losses,
        "--formats", args.formats,
        "--samples", str(args.samples),
        "--microbatches", str(args.microbatches),
        "--seed", str(args.seed),
        "--correction", args.correction,
        "--aggregation", args.aggregation,
        "--temperature", str(args.temperature),
        "--dispatcher", args.dispatcher,
        "--kl-coef", str(args.kl_coef),
        "--kl-estimator", args.kl_estimator,
        "--entropy-coef", str(args.entropy_coef),
        "--untrained", str(args.untrained),
        "--json-out", json_out,
    ]
    if args.bypass:
        cmd.append("--bypass")
    if args.negative_control:
        cmd.append("--negative-control")
    if args.distributed_optimizer:
        cmd.append("--distributed-optimizer")
    return cmd


def validate_request(args) -> list[Layout]:
    """Parse everything before launching anything: a bad layout or loss fails fast and clearly."""
    layouts = [Layout.parse(text) for text in args.layouts.split(",") if text.strip()]
    if not layouts:
        raise ValueError("no layouts given")
    from megatron_vespo.parity.worker import tiny_model_config  # heavy: only when the command runs

    model = tiny_model_config()
    for layout in layouts:
        layout.validate()
        model.check_layout(layout)
    for name in args.losses.split(","):
        LossConfig(name=name, correction=args.correction, aggregation=args.aggregation,
                   temperature=args.temperature, bypass=args.bypass, kl_coef=args.kl_coef,
                   kl_estimator=args.kl_estimator, entropy_coef=args.entropy_coef).validate()
    if not 0 <= args.untrained < args.samples:
        raise ValueError(f"--untrained {args.untrained}: give 0 to {args.samples - 1} (of --samples {args.samples})")
    if args.dispatcher == "allgather" and any(layout.pp > 1 for layout in layouts):
        raise ValueError("the allgather dispatcher rejects variable sequence lengths, which PP > 1 "
                         "uses here; choose --dispatcher alltoall for pipeline layouts")
    for fmt in args.formats.split(","):
        if fmt not in ("padded", "packed"):
            raise ValueError(f"unknown format {fmt!r}; choose padded and/or packed")
    return layouts


def _short(param: str) -> str:
    return param.replace("decoder.layers.", "layer").replace("mlp.experts.local_experts.", "expert").replace(
        "self_attention.", "attn.").replace(".weight", "")


def format_table(rows: list[dict], tolerance: float) -> str:
    header = ("layout", "format", "loss", "reference", "megatron", "loss rel", "grad rel (max)",
              "worst parameter", "ok")
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append((r["layout"], "-", "-", "-", "-", "-", "-", r["error"][:60], "FAIL"))
            continue
        ok = r["loss_rel_diff"] <= tolerance and r["grad_rel_diff"] <= tolerance
        lines.append((
            r["layout"], r["format"], r["loss"], f"{r['ref_loss']:+.6f}", f"{r['megatron_loss']:+.6f}",
            f"{r['loss_rel_diff']:.1e}", f"{r['grad_rel_diff']:.1e}", _short(r["worst_param"]),
            "ok" if ok else "FAIL",
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(str(v).ljust(w) for v, w in zip(line, widths)))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# Relative tolerance per device and layer spec, against the fp64 reference:
# * cpu: fp32 arithmetic throughout; the differences are summation order (~1e-7 .. 1e-6).
# * gpu, local spec: torch's fp32 CUDA kernels (TF32 off, torch's default), plus atomics in
#   scatter-adds: a few 1e-6 measured on an H200.
# * gpu, TransformerEngine spec: TE runs fp32 GEMMs in TF32 whatever torch's flags say (10-bit
#   mantissa: each product rounds at ~5e-4 relative); over a 4-layer model logits, losses and
#   gradients carry errors of a few 1e-3.
TOLERANCES = {"cpu": 1e-5, "gpu-local": 1e-4, "gpu-te": 5e-3}


def default_tolerance(device: str) -> tuple[float, str]:
    if device == "cpu":
        return TOLERANCES["cpu"], "fp32 on the CPU"
    from megatron_vespo.mcore.model import use_transformer_engine

    if use_transformer_engine():
        return TOLERANCES["gpu-te"], "TransformerEngine spec on the GPU: fp32 GEMMs run in TF32"
    return TOLERANCES["gpu-local"], "local spec on the GPU (no TransformerEngine): fp32 CUDA kernels"


def run_parity(args) -> int:
    try:
        layouts = validate_request(args)
        if args.device == "gpu":
            import torch

            needed = max(layout.world_size for layout in layouts)
            if torch.cuda.device_count() < needed:
                raise ValueError(f"--device gpu: layout {max(layouts, key=lambda l: l.world_size)} needs {needed} "
                                 f"GPUs, {torch.cuda.device_count()} visible")
    except ValueError as err:
        print(f"parity: {err}", file=sys.stderr)
        return 2
    if args.tolerance is None:
        args.tolerance, why = default_tolerance(args.device)
        print(f"parity: tolerance {args.tolerance:g} ({why})")
    # the reference runs on the CPU; with --device cpu Megatron too, on gloo
    env = worker_environment(single_thread=True, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}))
    rows: list[dict] = []
    print("Each check runs Megatron-Core's real forward/backward (get_forward_backward_func, DDP,\n"
          "finalize_model_grads) with the policy-loss hook on a seeded 4-layer MoE GPT (8 experts,\n"
          "top-2, GQA, one dense layer) under a parallel layout, and compares the loss and EVERY\n"
          "parameter gradient on EVERY rank with a single-process plain-PyTorch fp64 reference.")
    print(f"parity: {len(layouts)} layout(s), losses {args.losses}, formats {args.formats}, "
          f"tolerance {args.tolerance:g} (relative)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, layout in enumerate(layouts, 1):
            json_out = os.path.join(tmp, f"{layout}.json")
            start = time.perf_counter()
            print(f"[{i}/{len(layouts)}] {layout} on {layout.world_size} process(es) ...", end=" ", flush=True)
            proc = run_module(WORKER, layout.world_size, _worker_arguments(layout, args, json_out), env=env,
                              capture_output=True, text=True, timeout=args.timeout)
            seconds = time.perf_counter() - start
            if proc.returncode != 0 or not os.path.exists(json_out):
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
                print(f"FAILED after {seconds:.0f}s", flush=True)
                print("\n".join("    " + line for line in tail), file=sys.stderr)
                rows.append({"layout": str(layout), "error": f"worker exit code {proc.returncode}"})
                continue
            with open(json_out) as f:
                report = json.load(f)
            rows.extend(report["rows"])
            worst = max(max(r["loss_rel_diff"], r["grad_rel_diff"]) for r in report["rows"])
            print(f"done in {seconds:.0f}s (max rel diff {worst:.1e})", flush=True)
    print()
    print(format_table(rows, args.tolerance))
    failed = [r for r in rows if "error" in r or max(r["loss_rel_diff"], r["grad_rel_diff"]) > args.tolerance]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tolerance": args.tolerance, "rows": rows}, f, indent=1)
    print()
    if failed:
        print(f"parity FAILED: {len(failed)} of {len(rows)} checks exceed {args.tolerance:g} or did not run")
        return 1
    print(f"parity ok: {len(rows)} checks, every loss and every parameter gradient of every rank "
          f"within {args.tolerance:g} of the single-process reference")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--layouts", default="dp2,tp2,pp2,cp2,ep2",
                        help="comma-separated layouts, e.g. 'dp2,tp2,pp2,cp2,ep2,tp2ep2,pp2cp2,tp2pp2ep2'")
    parser.add_argument("--losses", default="vespo", help="comma-separated: vespo,grpo,gspo,sapo,cispo,gmpo")
    parser.add_argument("--formats", default="padded,packed")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=2, help="micro-batches per DP rank")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--correction", default="none", choices=["none", "tis", "mis", "fold"])
    parser.add_argument("--aggregation", default="token_mean")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--bypass", action="store_true", help="pi_old := engine log-probs")
    parser.add_argument("--kl-coef", type=float, default=0.0,
                        help="KL penalty to a reference policy (the samples carry reference log-probs)")
    parser.add_argument("--kl-estimator", default="k3", choices=["k1", "k2", "k3"])
    parser.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus")
    parser.add_argument("--untrained", type=int, default=0,
                        help="this many samples are not trained (as algorithm.mask_truncated makes them)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"relative; default by device and spec: {TOLERANCES} (see TOLERANCES in parity/launcher.py)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                        help="gpu: Megatron on the GPUs under NCCL, TransformerEngine's spec when it is installed "
                             "(the reference stays fp64 on the host)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per layout")
    parser.add_argument("--json", help="also write all results to this JSON file")
    parser.add_argument("--dispatcher", default="alltoall", choices=["alltoall", "allgather"],
                        help="MoE token dispatcher (allgather needs fixed sequence lengths: no PP)")
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="Megatron's distributed optimizer: gradients reduce-scattered, each rank's slices compared")
    parser.add_argument("--negative-control", action="store_true",
                        help="swap two experts in Megatron's weights: the check must then FAIL")
