"""``megatron-vespo plan`` against the memory of real training steps (CPU, gloo, fp32), ratios measured / predicted.

A Qwen3-MoE-shaped model (hidden 512, 4 layers with the first dense, 8 heads of 64, 4 KV groups,
16 experts top-4 of 256, dense FFN 1536, vocab 32000: 62 M parameters) is trained through the
project's ``Policy`` (``train/policy.py``: Megatron DDP with fp32 main grads, Megatron's Adam, the
loss hook) for two steps in each layout, each rank's micro-batches holding ``--tokens`` tokens in
sequences of ``--length``. Per rank it measures:

* parameters, gradients, optimizer state: bytes of the distinct storages behind the model's
  parameters, their ``main_grad`` buffers and the optimizer's master copies and moments (after
  the first step, which creates Adam's state);
* activations: what autograd keeps for the backward, counted in the first step when its first
  backward starts (patched ``schedules.backward_step``): the distinct storages of every tensor a
  saved-tensors hook saw saved and that is still alive, less the parameters, their grads and the
  logits (the plan's log-prob path);
* the step, from the resident size of the process (``/proc/self/status``: VmRSS now, VmHWM the
  most since a reset through ``/proc/self/clear_refs``), with glibc told to map every block of
  64 KiB or more on its own (``MALLOC_MMAP_THRESHOLD_``) so that a freed tensor leaves the
  resident size at once, whichever thread frees it. The second step is measured (Adam's state
  exists, as in every later step; the loss hook's cached workspace is released before it, so the
  step allocates it as the first does):
  - step peak over the state: VmHWM during the forward/backward (read when ``optimizer.step``
    starts) minus VmRSS at the step's start;
  - peak: parameters + gradients + that VmHWM minus VmRSS once the policy was built (optimizer
    state, caches and the process's other growth included).

Why not PyTorch's profiler (``profile_memory=True``): it records an allocation or a free only on
threads it profiles, and gloo drops the last reference to a collective's buffers on its worker
thread, so every uneven all-to-all looks like a leak (and ``profile_all_threads`` drops the memory
events altogether in torch 2.14).

Each quantity is compared with ``megatron_vespo.plan`` for the same model and layout (``--spec
local``, fp32, the distributed optimizer where Policy turns it on: dp > 1), on the most loaded rank
of each pipeline stage (the largest measured value against the plan's).

Usage: python benchmarks/bench_plan.py [--layouts single,dp2,tp2,ep2,pp2,cp2,recompute,...] [--tokens 2048]
       [--length 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
import weakref

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from proc_memory import reset_peak, status, storages  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             head_dim=64, intermediate_size=1536, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
             decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True, tie_word_embeddings=False,
             max_position_embeddings=8192, rms_norm_eps=1e-6)
# name -> (layout, micro-batches per step and data-parallel rank, full recompute)
CASES = {
    "single": ("single", 1, False),
    "dp2": ("dp2", 1, False),
    "tp2": ("tp2", 1, False),
    "ep2": ("ep2", 1, False),
    "pp2": ("pp2", 2, False),  # two micro-batches: stage 0 holds both when its first backward starts
    "cp2": ("cp2", 1, False),
    "recompute": ("single", 1, True),
    "tp2ep2": ("tp2ep2", 1, False),
    "pp2-recompute": ("pp2", 2, True),
    "pp2vpp2": ("pp2vpp2", 2, False),  # interleaved: rank 0 holds 4 chunk forwards, rank 1 three
}
# glibc: every block of 64 KiB or more is its own mapping, returned to the system when freed (by
# any thread; gloo frees a collective's buffers on its worker thread), so the resident size follows
# the bytes live instead of what malloc's arenas keep
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def make_model(directory: str) -> None:
    import transformers as tf

    torch.manual_seed(0)
    tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**MODEL)).save_pretrained(directory)


def _optimizer_tensors(optimizer):
    """Every tensor Megatron's optimizer(s) hold: torch's param groups (master copies) and state."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            yield from group["params"]
        for state in inner.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v))


def worker(args) -> None:
    from megatron.core.pipeline_parallel import schedules

    import megatron_vespo.hook as hook
    from megatron_vespo import comm, logprobs
    from megatron_vespo.batch import Sample
    from megatron_vespo.mcore.parallel import Layout
    from megatron_vespo.train.config import TrainConfig
    from megatron_vespo.train.policy import Policy

    layout_text, micro_batches, recompute = CASES[args.case]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parsed = Layout.parse(layout_text)
    layout = Layout.for_world(world, tp=parsed.tp, pp=parsed.pp, vpp=parsed.vpp, cp=parsed.cp, ep=parsed.ep,
                              etp=parsed.etp)
    cfg = TrainConfig()
    cfg.model.hf_dir = args.model
    cfg.model.recompute = recompute
    per_mb = args.tokens // args.length
    cfg.algorithm.micro_batch_size = per_mb
    policy = Policy(cfg, layout)
    ps = policy.ps
    params = [p for chunk in policy.chunks for p in chunk.parameters()]
    param_storages = storages(params)
    grad_storages = storages(getattr(p, "main_grad", None) for p in params)

    gen = torch.Generator().manual_seed(1)
    n = per_mb * micro_batches * layout.data_parallel
    prompt = 8  # short prompts: long responses, so the loss's chunk workspace fills as in RL
    samples = [Sample(tokens=torch.randint(0, MODEL["vocab_size"], (args.length,), generator=gen), prompt_len=prompt,
                      advantage=float(torch.randn(1, generator=gen)),
                      old_logprobs=-torch.rand(args.length - prompt, generator=gen))
               for _ in range(n)]

    logits_bytes, at, saved = [], {}, []
    real_loss, real_backward, real_opt = hook.loss_from_logits, schedules.backward_step, policy.optimizer.step
    excluded = set(param_storages) | set(grad_storages)

    def pack(t):
        # a detached alias: autograd's own reference to an output it saves would otherwise become a
        # cycle through the hook (freed only by the garbage collector)
        alias = t.detach()
        saved.append(weakref.ref(alias))
        return alias

    def kept_by_autograd() -> int:
        """Distinct storages autograd holds for the backward now (parameters and grads excluded)."""
        alive = (ref() for ref in saved)
        return sum(nbytes for ptr, nbytes in storages(t for t in alive if t is not None).items() if ptr not in excluded)

    def marked_loss(logits, *a, **k):
        logits_bytes.append(logits.untyped_storage().nbytes())
        return real_loss(logits, *a, **k)

    def marked_backward(*a, **k):
        if "backward" not in at:  # the first backward of the step
            at["backward"] = status("VmRSS")
            if saved:
                at["kept"] = kept_by_autograd()
        return real_backward(*a, **k)

    def marked_opt(*a, **k):
        at.setdefault("fwd_bwd_peak", status("VmHWM"))
        return real_opt(*a, **k)

    hook.loss_from_logits, schedules.backward_step, policy.optimizer.step = marked_loss, marked_backward, marked_opt
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    gc.collect()
    built = status("VmRSS")
    steps = []
    for step in range(2):
        logprobs.release_workspace()  # so each step allocates it, as the first one does
        gc.collect()
        at.clear()
        saved.clear()
        start = status("VmRSS")
        reset_peak()
        # the first step counts what autograd keeps (hooks on every saved tensor) and creates Adam's
        # state; the second, untouched, is the one whose resident memory is measured
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if step == 0 else contextlib.nullcontext()
        with hooks:
            policy.train_step(samples, list(range(n)))
        workspace = sum(b.untyped_storage().nbytes() for b in logprobs._WORKSPACE.values())
        transient = (logits_bytes[-1] + workspace) if last else 0
        steps.append(dict(start=start - built, kept=at.get("kept", 0) - (logits_bytes[-1] if last else 0),
                          resident_activations=at["backward"] - start - transient,
                          step_extra=at["fwd_bwd_peak"] - start, peak=at["fwd_bwd_peak"] - built))
    optimizer_bytes = sum(nbytes for ptr, nbytes in storages(_optimizer_tensors(policy.optimizer)).items()
                          if ptr not in excluded)
    params_bytes, grads_bytes = sum(param_storages.values()), sum(grad_storages.values())
    row = dict(
        rank=torch.distributed.get_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(), last_stage=last,
        parameters=params_bytes, gradients=grads_bytes, optimizer=optimizer_bytes,
        # resident growth over the first step: Adam's state plus what the step left (cross-checks the count)
        optimizer_allocated=steps[1]["start"],
        activations=steps[0]["kept"], resident_activations=steps[1]["resident_activations"],
        step_extra=steps[1]["step_extra"], peak=params_bytes + grads_bytes + steps[1]["peak"], steps=steps,
        logits=logits_bytes[-1] if last else 0, workspace=workspace if last else 0,
        distributed_optimizer=bool(getattr(policy, "distributed_optimizer", False)),
    )
    rows = comm.gather_objects(row, dst=0)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(dict(case=args.case, layout=str(layout), rows=rows), f)
    comm.barrier()
    torch.distributed.destroy_process_group()


def predicted(case: str, model_dir: str, tokens: int, length: int, distributed: bool):
    from megatron_vespo.convert.families import load_model_config
    from megatron_vespo.mcore.parallel import Layout
    from megatron_vespo.plan import PlanInput, make_plan

    layout_text, micro_batches, recompute = CASES[case]
    parsed = Layout.parse(layout_text)
    layout = Layout.for_world(parsed.world_size, tp=parsed.tp, pp=parsed.pp, vpp=parsed.vpp, cp=parsed.cp,
                              ep=parsed.ep, etp=parsed.etp)
    _, m = load_model_config(model_dir)
    return layout, make_plan(PlanInput(model=m, layout=layout, max_tokens=tokens, params_dtype="float32",
                                       distributed_optimizer=distributed,
                                       recompute="full" if recompute else "none", micro_batches=micro_batches,
                                       spec="local", sequence_length=length))


QUANTITIES = ("parameters", "gradients", "optimizer", "activations", "step_extra", "peak")


def run_case(case: str, model_dir: str, args) -> list[dict]:
    from megatron_vespo.launcher import worker_environment
    from megatron_vespo.mcore.parallel import Layout

    layout_text = CASES[case][0]
    world = Layout.parse(layout_text).world_size
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable]
        if world > 1:
            cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        cmd += [os.path.abspath(__file__), "--worker", "--case", case, "--model", model_dir, "--tokens",
                str(args.tokens), "--length", str(args.length), "--out", out]
        env = worker_environment(single_thread=True, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT, **MALLOC_ENV)
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{case} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        seconds = time.perf_counter() - start
        with open(out) as f:
            measured = json.load(f)
    distributed = measured["rows"][0]["distributed_optimizer"]
    layout, plan = predicted(case, model_dir, args.tokens, args.length, distributed)
    results = []
    for rank_plan in plan.ranks:
        rows = [r for r in measured["rows"] if r["pp_rank"] == rank_plan.pp_rank]
        want = dict(parameters=rank_plan.parameters, gradients=rank_plan.gradients, optimizer=rank_plan.optimizer,
                    activations=rank_plan.activations, step_extra=rank_plan.step_extra, peak=rank_plan.peak)
        got = {q: max(r[q] for r in rows) for q in QUANTITIES}
        results.append(dict(case=case, layout=str(layout), pp_rank=rank_plan.pp_rank, ranks=len(rows),
                            distributed_optimizer=distributed, seconds=seconds,
                            predicted=want, measured=got, ratio={q: got[q] / want[q] for q in QUANTITIES},
                            spread={q: (min(r[q] for r in rows), max(r[q] for r in rows)) for q in QUANTITIES},
                            logprob_path=rank_plan.logprob_path, rows=rows))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", default="single,dp2,tp2,ep2,pp2,cp2,recompute")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of one micro-batch on one data-parallel rank")
    parser.add_argument("--length", type=int, default=256, help="tokens of one sequence")
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    unknown = [c for c in args.layouts.split(",") if c not in CASES]
    if unknown:
        parser.error(f"unknown layouts {unknown}; choose from {sorted(CASES)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or os.path.join(tmp, "model")
        if args.model is None:
            make_model(model_dir)
        for case in args.layouts.split(","):
            for r in run_case(case, model_dir, args):
                results.append(r)
                mib = 2**20
                print(f"{case:14s} {r['layout']:12s} pp{r['pp_rank']} "
                      + " ".join(f"{q} {r['measured'][q] / mib:7.1f}/{r['predicted'][q] / mib:7.1f} "
                                 f"({r['ratio'][q]:.3f})" for q in QUANTITIES), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tokens=args.tokens, length=args.length, model=MODEL, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
