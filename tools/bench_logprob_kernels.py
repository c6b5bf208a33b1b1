#!/usr/bin/env python
"""Times the log-prob path (megatron_vespo.logprobs) on bf16 logits: a device-to-device copy of
the logits, the chunked torch path and the fused Triton path, forward + backward with the
gradient written into the logits (inplace_grad=True, as the trainer does). Prints ONE JSON line
and exits 0 (errors are reported in it, under "errors"):

    copy_ms, {torch,triton}_ms (forward + backward), {torch,triton}_{fwd,bwd}_ms,
    {torch,triton}_ratio = 1.5 * copy_ms / path_ms (three passes over the logits -- forward read,
    backward read + write -- against the copy's two; the target is >= 0.8),
    check: Triton vs torch vs fp64 on a slice (every other row, temperature 0.7, both inplace_grad),
    sweep: the Triton kernels alone for a few block sizes / warp counts.

    python tools/bench_logprob_kernels.py                     # CUDA: 8192 x 151936
    TRITON_INTERPRET=1 python tools/bench_logprob_kernels.py  # CPU smoke test: 8 x 1000
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_vespo import logprobs  # noqa: E402

CUDA = torch.cuda.is_available()
FWD_CONFIGS = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]  # (block, warps)
BWD_CONFIGS = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]


def stamp():
    if CUDA:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed_ms(start, end) -> float:
    if CUDA:
        end.synchronize()
        return start.elapsed_time(end)
    return (end - start) * 1e3


def time_copy(base, repeat, warmup):
    dst = torch.empty_like(base)
    total = 0.0
    for it in range(warmup + repeat):
        t0 = stamp()
        dst.copy_(base)
        t1 = stamp()
        total += elapsed_ms(t0, t1) if it >= warmup else 0.0
    return total / repeat


def time_path(kernel, base, work, rows, targets, weights, repeat, warmup):
    """(forward ms, backward ms) of one path, each iteration on a fresh copy of the logits."""
    logprobs.KERNEL = kernel
    fwd = bwd = 0.0
    for it in range(warmup + repeat):
        work.copy_(base)  # the in-place gradient overwrote the last one
        x = work.detach().requires_grad_(True)
        t0 = stamp()
        logp, _ = logprobs.vocab_parallel_logprobs(x, rows, targets, inplace_grad=True)
        t1 = stamp()
        torch.autograd.grad(logp, x, grad_outputs=weights)
        t2 = stamp()
        if it >= warmup:
            fwd += elapsed_ms(t0, t1)
            bwd += elapsed_ms(t1, t2)
    return fwd / repeat, bwd / repeat


def run_once(kernel, logits, rows, targets, weights, temperature, inplace):
    logprobs.KERNEL = kernel
    x = logits.clone().requires_grad_(True)
    logp, entropy = logprobs.vocab_parallel_logprobs(x, rows, targets, temperature=temperature,
                                                     inplace_grad=inplace)
    (grad,) = torch.autograd.grad(logp, x, grad_outputs=weights)
    return logp.detach().double(), entropy.double(), grad.detach()


def check(base, slice_rows):
    """Triton vs torch vs fp64 on the first slice_rows rows: every other row, temperature 0.7."""
    logits = base[:slice_rows]
    rows = torch.arange(0, logits.shape[0], 2, device=base.device)
    gen = torch.Generator(device=base.device).manual_seed(1)
    targets = torch.randint(0, logits.shape[1], (rows.numel(),), device=base.device, generator=gen)
    weights = torch.randn(rows.numel(), device=base.device, generator=gen)
    z = logits[rows[:8]].double() / 0.7  # fp64 reference on 8 rows
    log_p = torch.log_softmax(z, dim=-1)
    ref_logp = log_p.gather(1, targets[:8, None])[:, 0]
    ref_entropy = -(log_p.exp() * log_p).sum(-1)
    onehot = torch.zeros_like(z).scatter_(1, targets[:8, None], 1.0)
    ref_grad = (onehot - log_p.exp()) * weights[:8, None].double() / 0.7
    out = {}
    torch_logp, torch_entropy, torch_grad = run_once("torch", logits, rows, targets, weights, 0.7, False)
    for inplace in (True, False):
        logp, entropy, grad = run_once("triton", logits, rows, targets, weights, 0.7, inplace)
        unused = grad[1::2]
        out[f"inplace_{inplace}"] = {
            "logp_vs_torch": float((logp - torch_logp).abs().max()),
            "entropy_vs_torch": float((entropy - torch_entropy).abs().max()),
            "grad_vs_torch": float((grad.double() - torch_grad.double()).abs().max()),
            "grad_bf16_entries_differing_from_torch": int((grad != torch_grad).sum()),
            "logp_vs_fp64": float((logp[:8] - ref_logp).abs().max()),
            "entropy_vs_fp64": float((entropy[:8] - ref_entropy).abs().max()),
            "grad_vs_fp64": float((grad[rows[:8]].double() - ref_grad).abs().max()),
            "unselected_rows_zero": bool((unused == 0).all()),
        }
    out["torch_vs_fp64"] = {"logp": float((torch_logp[:8] - ref_logp).abs().max()),
                            "grad": float((torch_grad[rows[:8]].double() - ref_grad).abs().max())}
    out["max_abs_grad"] = float(ref_grad.abs().max())
    return out


def sweep(base, rows, targets, weights, repeat, warmup, copy_ms):
    """The two kernels alone (forward; backward into a separate buffer) per (block, warps), with
    their throughput as a fraction of the copy's (forward: one pass, backward: two)."""
    from megatron_vespo import logprobs_kernels as K

    results = {"defaults": {"FWD_BLOCK": K.FWD_BLOCK, "FWD_WARPS": K.FWD_WARPS, "BWD_BLOCK": K.BWD_BLOCK,
                            "BWD_WARPS": K.BWD_WARPS},
               "forward": [], "backward": []}
    log_z = K.row_stats(base, rows, targets, 1.0)[:, 0].contiguous()  # one shard: its lse is log Z
    out = torch.empty_like(base)
    for kind, configs in (("forward", FWD_CONFIGS), ("backward", BWD_CONFIGS)):
        for block, warps in configs:
            entry = {"block": block, "warps": warps}
            try:
                total = 0.0
                for it in range(warmup + repeat):
                    t0 = stamp()
                    if kind == "forward":
                        K.row_stats(base, rows, targets, 1.0, block=block, num_warps=warps)
                    else:
                        K.logit_grad(base, rows, targets, log_z, weights, 1.0, out=out, block=block,
                                     num_warps=warps)
                    t1 = stamp()
                    total += elapsed_ms(t0, t1) if it >= warmup else 0.0
                entry["ms"] = total / repeat
                passes = 1 if kind == "forward" else 2  # over the logits; the copy makes 2 in copy_ms
                entry["ratio_to_copy"] = passes * (copy_ms / 2) / entry["ms"] if copy_ms else None
            except Exception as exc:  # e.g. out of registers for one config: keep the others
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            results[kind].append(entry)
    return results


def measure(args, result) -> None:
    device = "cuda" if CUDA else "cpu"
    errors = result["errors"]
    logprobs.KERNEL = "auto"
    gen = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(args.tokens, args.vocab, device=device, generator=gen).bfloat16()
    try:
        result["auto_uses_triton"] = logprobs._use_kernels(base) is not None  # what the trainer gets
    except Exception:
        errors["auto"] = traceback.format_exc()[-2000:]
    rows = torch.arange(args.tokens, device=device)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)
    weights = torch.randn(args.tokens, device=device, generator=gen)
    try:
        result["copy_ms"] = time_copy(base, args.repeat, args.warmup)
    except Exception:
        errors["copy"] = traceback.format_exc()[-2000:]
    work = torch.empty_like(base)
    for kernel in ("torch", "triton"):
        try:
            fwd, bwd = time_path(kernel, base, work, rows, targets, weights, args.repeat, args.warmup)
            result.update({f"{kernel}_fwd_ms": fwd, f"{kernel}_bwd_ms": bwd, f"{kernel}_ms": fwd + bwd})
            if "copy_ms" in result:
                result[f"{kernel}_ratio"] = 1.5 * result["copy_ms"] / (fwd + bwd)
        except Exception:
            errors[kernel] = traceback.format_exc()[-2000:]
    del work
    try:
        result["check"] = check(base, min(args.check_rows, args.tokens))
    except Exception:
        errors["check"] = traceback.format_exc()[-2000:]
    if not args.no_sweep:
        try:
            result["sweep"] = sweep(base, rows, targets, weights, args.repeat, args.warmup, result.get("copy_ms"))
        except Exception:
            errors["sweep"] = traceback.format_exc()[-2000:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192 if CUDA else 8)
    parser.add_argument("--vocab", type=int, default=151936 if CUDA else 1000)
    parser.add_argument("--repeat", type=int, default=10 if CUDA else 1)
    parser.add_argument("--warmup", type=int, default=3 if CUDA else 1)
    parser.add_argument("--check-rows", type=int, default=1024 if CUDA else 8)
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()

    result = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "tokens": args.tokens, "vocab": args.vocab,
              "dtype": "bfloat16", "torch": torch.__version__, "target_ratio": 0.8,
              "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "errors": {}}
    try:
        result["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        result["triton"] = None
    try:
        measure(args, result)
    except BaseException:  # still print what was measured
        result["errors"]["measure"] = traceback.format_exc()[-2000:]
    logprobs.KERNEL = "auto"
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
