"""Scaling features of the trainer (issue 18): the distributed optimizer and token-budget
micro-batches, every number a ratio against a baseline measured in the same run.

Everything runs through the project's ``Policy`` (``train/policy.py``: Megatron DDP with fp32 main
grads, Megatron's Adam, the loss hook) on CPU (gloo), on tiny Qwen3-MoE-shaped Hugging Face models
made here with transformers.

1. Optimizer-state bytes per rank, dp2 with the distributed optimizer / dp1 without (target <= 0.55).
   The bytes of the distinct storages the optimizer holds (Adam's moments and step counters, fp32
   master copies when any, the distributed optimizer's shards), less those that are the model's
   parameters or their ``main_grad`` buffers, after one step (which creates Adam's state). fp32
   parameters (the config's default: no master copies) and bf16 (fp32 master copies), one dp1
   process and one dp2 torchrun launch holding both dp2 policies.
2. Peak memory of one train step on 8 responses of 256..4096 tokens (random, fixed seed) after a
   64-token prompt (fp32, 1 process): micro-batches packed to a token budget of the longest possible
   sequence, 64 + 4096 (``algorithm.max_tokens_per_micro_batch``) / fixed 2-sequence micro-batches
   (``algorithm.micro_batch_size=2``; without a pipeline the Policy gives each its own width).
   One fresh process per variant (glibc's mmap threshold at 64 KiB, so the resident size follows
   the bytes live), the Policy built and one warm-up step on two short sequences taken (Adam's
   state and Megatron's lazy buffers exist, as in every later step); then the peak resident size of
   the measured step (VmHWM, reset through /proc/self/clear_refs) minus the resident size before it.
   Target <= 0.6.
3. Padding fraction under the token budget: padded token slots / all slots of the step, from the
   Policy's own micro-batches in (2) (pp = 1: each micro-batch its own width) and from
   ``batch.token_budget_plan`` with ``packed_width`` in several layouts (CP / TP rounding; a
   pipeline pads every micro-batch to the widest), next to the least padding any split into
   micro-batches of one width can have (every set partition tried); also over many random draws
   of 8 and 32 lengths (with the widest micro-batch's width, budget / pairs, on each). Target <= 5%.
4. Step time at dp2 (2 processes, gloo): distributed optimizer / plain DDP + Adam, two policies
   of the same model in one launch (30 M parameters, fp32, 16 sequences of 272 tokens, micro-batches
   of 4), their steps alternated (order flipped every round), medians; also the median of the
   adjacent steps' ratios and each rank's seconds in the gradient reduction and the optimizer step.
   Target <= 1.05.

Usage: python benchmarks/bench_scale.py [--quick] [--json OUT] [--dtypes float32,bfloat16] [--seed 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from proc_memory import reset_peak, status, storages  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (1) and (4): per-parameter state dominates (30 M parameters, 3 MoE layers of 16 experts)
STATE_MODEL = dict(vocab_size=16000, hidden_size=384, num_hidden_layers=4, num_attention_heads=6,
                   num_key_value_heads=2, head_dim=64, intermediate_size=1152, moe_intermediate_size=256,
                   num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[0],
                   norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=8192)
# (2): long sequences on CPU (a step's peak follows its widest micro-batch)
MEMORY_MODEL = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, intermediate_size=1024, moe_intermediate_size=256,
                    num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0],
                    norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=8192)
QUICK_STATE_MODEL = dict(STATE_MODEL, vocab_size=4096, hidden_size=128, num_attention_heads=4, head_dim=32,
                         intermediate_size=384, moe_intermediate_size=128, num_experts=8)
QUICK_MEMORY_MODEL = dict(MEMORY_MODEL, hidden_size=128, head_dim=32, intermediate_size=384,
                          moe_intermediate_size=128)
# glibc: every block of 64 KiB or more is its own mapping, returned to the system when freed
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def make_model(directory: str, spec: dict) -> None:
    import transformers as tf

    torch.manual_seed(0)
    tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**spec)).save_pretrained(directory)


def response_lengths(n: int, low: int, high: int, seed: int) -> list[int]:
    """``n`` response lengths drawn uniformly from [low, high] (fixed seed)."""
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def make_samples(lengths: list[int], prompt: int, vocab: int, seed: int):
    """Samples of ``prompt`` + ``lengths[i]`` random tokens, random advantages and pi_old log-probs."""
    from megatron_vespo.batch import Sample

    gen = torch.Generator().manual_seed(seed)
    return [Sample(tokens=torch.randint(0, vocab, (prompt + n,), generator=gen), prompt_len=prompt,
                   advantage=float(torch.randn(1, generator=gen)), old_logprobs=-torch.rand(n, generator=gen))
            for n in lengths]


def optimizer_state_bytes(policy) -> dict:
    """Bytes the optimizer holds beyond the model's parameters and gradient buffers: Adam's state
    (moments, step counters) and the master copies / shards in its param groups."""
    params = [p for chunk in policy.chunks for p in chunk.parameters()]
    own = set(storages(params)) | set(storages(getattr(p, "main_grad", None) for p in params))
    state, masters = {}, {}
    for opt in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            masters.update(storages(group["params"]))
        for values in inner.state.values():
            state.update(storages(v for v in values.values() if torch.is_tensor(v)))
    state = {k: v for k, v in state.items() if k not in own}
    masters = {k: v for k, v in masters.items() if k not in own and k not in state}
    return dict(adam_state=sum(state.values()), master_params=sum(masters.values()),
                total=sum(state.values()) + sum(masters.values()),
                parameters=sum(p.numel() for p in params))


# -- workers (fresh processes) -------------------------------------------------------------------

def _build_policy(args, layout, distributed: bool, dtype: str, first: bool, **algorithm):
    """A Policy of ``args.model``; ``first=False`` reuses the process groups the first one made."""
    from megatron_vespo.train.config import TrainConfig
    from megatron_vespo.train.policy import Policy

    cfg = TrainConfig()
    cfg.model.hf_dir = args.model
    cfg.model.params_dtype = dtype
    cfg.optimizer.distributed = distributed
    for key, value in algorithm.items():
        setattr(cfg.algorithm, key, value)
    return Policy(cfg, layout, reuse_process_groups=not first)


def state_worker(args) -> None:
    """(1) and, at dp2, (4): optimizer-state bytes of each policy on each rank; alternating steps."""
    from megatron_vespo import comm
    from megatron_vespo.mcore.parallel import Layout

    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = Layout.for_world(world)
    spec = json.load(open(os.path.join(args.model, "config.json")))
    # dp1: the plain optimizer (the baseline); dp2: the distributed one, and plain for comparison
    variants = [("plain", False)] if world == 1 else [("distributed", True), ("plain", False)]
    dtypes = args.dtypes.split(",")
    warm = make_samples([32] * (2 * world), 8, spec["vocab_size"], seed=3)
    policies, result = {}, {"world": world, "layout": str(layout), "bytes": {}}
    for dtype in dtypes:
        for name, distributed in variants:
            policy = _build_policy(args, layout, distributed, dtype, first=not policies)
            assert policy.distributed_optimizer == distributed
            policy.train_step(warm, list(range(len(warm))))  # creates Adam's state
            result["bytes"][f"{name}/{dtype}"] = comm.gather_objects(optimizer_state_bytes(policy), dst=0)
            if world > 1 and dtype == "float32":
                policies[name] = policy  # kept for the step times
            else:
                del policy
            gc.collect()
    if world > 1:
        n = args.time_samples
        samples = make_samples([args.time_length] * n, 16, spec["vocab_size"], seed=4)
        ids = list(range(n))
        for policy in policies.values():
            policy.cfg.algorithm.micro_batch_size = args.time_mbs
        parts = {}  # seconds of this rank in the gradient reduction and in the optimizer step

        def timed(name, part, fn):
            def wrapper(*a, **k):
                start = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    parts[(name, part)] = parts.get((name, part), 0.0) + time.perf_counter() - start
            return wrapper

        for name, policy in policies.items():
            policy.config.finalize_model_grads_func = timed(name, "grad_reduce", policy.config.finalize_model_grads_func)
            policy.optimizer.step = timed(name, "optimizer_step", policy.optimizer.step)
        times = {name: [] for name in policies}
        split = {f"{name}/{part}": [] for name in policies for part in ("grad_reduce", "optimizer_step")}
        names = list(policies)
        for i in range(args.warmup + args.steps):
            for name in (names if i % 2 == 0 else names[::-1]):
                parts.clear()
                comm.barrier()
                start = time.perf_counter()
                policies[name].train_step(samples, ids)
                comm.barrier()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                    for part in ("grad_reduce", "optimizer_step"):
                        split[f"{name}/{part}"].append(parts.get((name, part), 0.0))
        result["step_seconds"] = times
        result["part_seconds"] = comm.gather_objects(split, dst=0)
        result["step_tokens"] = n * (16 + args.time_length)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    comm.barrier()
    torch.distributed.destroy_process_group()


def memory_worker(args) -> None:
    """(2) and (3): one process, one variant; the resident peak of one train step on the 8 samples
    over the resident size before it."""
    from megatron_vespo import logprobs
    from megatron_vespo.mcore.parallel import Layout

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    spec = json.load(open(os.path.join(args.model, "config.json")))
    lengths = response_lengths(8, args.min_response, args.max_response, args.seed)
    samples = make_samples(lengths, args.prompt, spec["vocab_size"], seed=args.seed)
    algorithm = (dict(max_tokens_per_micro_batch=args.budget) if args.variant == "budget"
                 else dict(micro_batch_size=2))
    gc.collect()
    before_build = status("VmRSS")
    policy = _build_policy(args, Layout(), False, "float32", first=True, **algorithm)
    shapes = []
    real = policy._micro_batches

    def recorded(*a, **k):
        micro_batches, groups = real(*a, **k)
        shapes.append([dict(width=int(mb.tokens.numel()), real=int((mb.seq_index >= 0).sum()), samples=g)
                       for mb, g in zip(micro_batches, groups)])
        return micro_batches, groups

    policy._micro_batches = recorded
    ids = list(range(len(samples)))
    # a warm-up step on two short sequences creates Adam's state and Megatron's lazy buffers (as they
    # are in every step but the first); the measured step's peak is taken over what is resident then
    warm = make_samples([32, 32], args.prompt, spec["vocab_size"], seed=args.seed + 1)
    policy.train_step(warm, [0, 1])
    logprobs.release_workspace()  # so the measured step allocates it, as any step's log-probs do
    gc.collect()
    start = status("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    policy.train_step(samples, ids)
    seconds = time.perf_counter() - t0
    peak = status("VmHWM")
    steps = [dict(before=start, peak=peak, extra=peak - start, seconds=seconds)]
    result = dict(variant=args.variant, lengths=[s.tokens.numel() for s in samples], micro_batches=shapes[-1],
                  resident_growth_before_step=steps[0]["before"] - before_build, steps=steps,
                  optimizer=optimizer_state_bytes(policy))
    with open(args.out, "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


# -- driver --------------------------------------------------------------------------------------

def _launch(args, extra: list[str], nproc: int = 1) -> dict:
    from megatron_vespo.launcher import worker_environment

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [sys.executable]
        if nproc > 1:
            cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += [os.path.abspath(__file__), "--out", out] + extra
        env = worker_environment(single_thread=nproc > 1, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT, **MALLOC_ENV)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(extra)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


def plan_padding(lengths: list[int], budget: int, pp: int = 1, cp: int = 1, tp: int = 1) -> dict:
    """Padding of the token-budget plan (and of fixed pairs) for sequences of ``lengths`` on one
    data rank, padded as Policy._micro_batches pads them: under a pipeline (pp > 1) every
    micro-batch to the widest, without one each to its own packed width (CP / TP rounding only)."""
    from megatron_vespo.batch import packed_width, partition, token_budget_plan

    seq_multiple = 2 * cp if cp > 1 else 1
    total_multiple = seq_multiple * tp
    out = {}
    for name, plan in (("budget", token_budget_plan(lengths, 1, budget, seq_multiple, total_multiple)),
                       ("pairs", partition(len(lengths), 1, len(lengths) // 2))):
        widths = [packed_width(lengths, g, seq_multiple, total_multiple) for g in plan[0]]
        if pp > 1:
            widths = [max(widths)] * len(widths)
        slots = sum(widths)
        out[name] = dict(micro_batches=len(plan[0]), width=max(widths), widths=widths, slots=slots,
                         tokens=sum(lengths), padding=1 - sum(lengths) / slots, groups=plan[0])
    return out


def padding_optimum(lengths: list[int], budget: int) -> float:
    """The least padding of any split of ``lengths`` into micro-batches padded to one width (the
    widest, at most ``budget``), by trying every set partition (8 sequences: 4140 of them)."""
    total, n = sum(lengths), len(lengths)
    order = sorted(lengths, reverse=True)
    best = [float("inf")]

    def place(i: int, loads: list[int]) -> None:
        slots = len(loads) * max(loads) if loads else 0
        if slots >= best[0]:  # slots only grow as sequences are placed
            return
        if i == n:
            best[0] = slots
            return
        for b in range(len(loads)):
            if loads[b] + order[i] <= budget:
                loads[b] += order[i]
                place(i + 1, loads)
                loads[b] -= order[i]
        place(i + 1, loads + [order[i]])

    place(0, [])
    return 1 - total / best[0]


def padding_over_draws(draws: int, n: int, prompt: int, low: int, high: int, budget: int,
                       layouts: dict) -> dict:
    """The plan's padding over ``draws`` random draws of ``n`` response lengths in each of
    ``layouts`` (name -> plan_padding's pp/cp/tp), with the least padding any split into
    micro-batches of one width could have (n <= 8) and the widest micro-batch, budget / pairs."""
    padding = {name: [] for name in layouts}
    optima, pair_padding, widths = [], [], []
    for seed in range(draws):
        lengths = [prompt + r for r in response_lengths(n, low, high, 1000 + seed)]
        for name, layout in layouts.items():
            padding[name].append(plan_padding(lengths, budget, **layout)["budget"]["padding"])
        p = plan_padding(lengths, budget)
        if n <= 8:
            optima.append(padding_optimum(lengths, budget))
        pair_padding.append(plan_padding(lengths, budget, pp=2)["pairs"]["padding"])
        widths.append(p["budget"]["width"] / p["pairs"]["width"])  # widest micro-batch, budget / pairs
    widths.sort()
    out = dict(draws=draws, sequences=n, layouts={},
               optimum_median=statistics.median(optima) if optima else None,
               pairs_one_width_median=statistics.median(pair_padding), width_ratio_median=statistics.median(widths),
               width_ratio_p10=widths[int(0.1 * draws)], width_ratio_p90=widths[int(0.9 * draws)],
               width_ratio_max=widths[-1], width_ratio_at_most_0_6=sum(w <= 0.6 for w in widths) / draws)
    for name, values in padding.items():
        at_optimum = (sum(b <= o + 1e-9 for b, o in zip(values, optima)) / draws
                      if optima and layouts[name].get("pp", 1) > 1 else None)
        values = sorted(values)
        out["layouts"][name] = dict(median=statistics.median(values), p90=values[int(0.9 * draws)],
                                    max=values[-1], at_most_5pct=sum(v <= 0.05 for v in values) / draws,
                                    at_optimum=at_optimum)
    return out


# layouts whose padding the draws report: pp = 1 pads each micro-batch only to CP / TP multiples,
# a pipeline pads all to the widest
PADDING_LAYOUTS = {"pp1": dict(), "pp1 cp2 tp2": dict(cp=2, tp=2), "pp2": dict(pp=2), "pp2 cp2 tp2": dict(pp=2, cp=2, tp=2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller models, shorter sequences, fewer steps")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="parameter dtypes for the optimizer bytes")
    parser.add_argument("--seed", type=int, default=1, help="seeds the 8 response lengths and tokens")
    for hidden in ("--worker", "--model", "--out", "--variant", "--budget", "--prompt", "--min-response",
                   "--max-response", "--time-samples", "--time-length", "--time-mbs", "--steps", "--warmup"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS,
                            type=str if hidden in ("--worker", "--model", "--out", "--variant") else int)
    args = parser.parse_args(argv)
    if args.worker == "state":
        state_worker(args)
        return 0
    if args.worker == "memory":
        memory_worker(args)
        return 0

    q = args.quick
    prompt, low, high = (16, 32, 512) if q else (64, 256, 4096)
    budget = prompt + high  # the longest sequence there can be
    steps, warmup = (2, 1) if q else (12, 1)
    time_samples, time_length, time_mbs = (8, 128, 2) if q else (16, 256, 4)
    mib = 2**20
    results = dict(quick=q)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        state_dir, memory_dir = os.path.join(tmp, "state"), os.path.join(tmp, "memory")
        make_model(state_dir, QUICK_STATE_MODEL if q else STATE_MODEL)
        make_model(memory_dir, QUICK_MEMORY_MODEL if q else MEMORY_MODEL)

        # (1) and (4)
        common = ["--worker", "state", "--model", state_dir, "--dtypes", args.dtypes]
        dp1 = _launch(args, common)
        dp2 = _launch(args, common + ["--time-samples", str(time_samples), "--time-length", str(time_length),
                                      "--time-mbs", str(time_mbs), "--steps", str(steps), "--warmup", str(warmup)],
                      nproc=2)
        print(f"[1] optimizer-state bytes per rank ({dp1['bytes']['plain/float32'][0]['parameters'] / 1e6:.1f} M "
              f"parameters, Adam), dp2 with the distributed optimizer / dp1 without:")
        state = {}
        for dtype in args.dtypes.split(","):
            base = dp1["bytes"][f"plain/{dtype}"][0]["total"]
            ranks = [r["total"] for r in dp2["bytes"][f"distributed/{dtype}"]]
            plain2 = dp2["bytes"][f"plain/{dtype}"][0]["total"]
            state[dtype] = dict(dp1_plain=base, dp2_distributed=ranks, dp2_plain=plain2,
                                ratio_rank0=ranks[0] / base, ratio_max=max(ranks) / base,
                                detail=dict(dp1=dp1["bytes"][f"plain/{dtype}"],
                                            dp2_distributed=dp2["bytes"][f"distributed/{dtype}"]))
            print(f"    {dtype:8s} dp1 {base / mib:7.1f} MiB, dp2 rank 0 {ranks[0] / mib:7.1f} MiB "
                  f"(rank 1 {ranks[1] / mib:.1f}), ratio {ranks[0] / base:.3f} (max over ranks "
                  f"{max(ranks) / base:.3f}; target <= 0.55); dp2 plain {plain2 / mib:.1f} MiB")
        results["optimizer_state"] = state
        seconds = dp2["step_seconds"]
        times = {k: statistics.median(v) for k, v in seconds.items()}
        ratio = times["distributed"] / times["plain"]
        # each distributed step against the plain step next to it (they alternate): drift cancels
        pairwise = statistics.median(d / p for d, p in zip(seconds["distributed"], seconds["plain"]))
        parts = {k: [statistics.median(rank[k]) for rank in dp2["part_seconds"]] for k in dp2["part_seconds"][0]}
        results["step_time"] = dict(median_seconds=times, ratio=ratio, pairwise_ratio=pairwise, seconds=seconds,
                                    part_median_seconds_per_rank=parts, tokens=dp2["step_tokens"],
                                    samples=time_samples, length=16 + time_length, micro_batch_size=time_mbs)
        print(f"[4] step time at dp2 ({time_samples} x {16 + time_length} tokens, micro-batches of {time_mbs}, "
              f"medians of {steps} alternating steps): distributed {times['distributed']:.3f} s, plain "
              f"{times['plain']:.3f} s, ratio {ratio:.3f} (target <= 1.05); median of adjacent-step ratios "
              f"{pairwise:.3f}")
        for name in ("distributed", "plain"):
            print(f"    {name:11s} per rank: gradient reduction "
                  + "/".join(f"{v:.3f}" for v in parts[f"{name}/grad_reduce"]) + " s, optimizer step "
                  + "/".join(f"{v:.3f}" for v in parts[f"{name}/optimizer_step"]) + " s")

        # (2) and (3)
        lengths = [prompt + n for n in response_lengths(8, low, high, args.seed)]
        plan = plan_padding(lengths, budget)
        mem = {}
        for variant in ("pairs", "budget"):
            mem[variant] = _launch(args, ["--worker", "memory", "--model", memory_dir, "--variant", variant,
                                          "--budget", str(budget), "--prompt", str(prompt), "--min-response",
                                          str(low), "--max-response", str(high), "--seed", str(args.seed)])
        assert mem["budget"]["lengths"] == lengths
        extra = [mem[v]["steps"][0]["extra"] for v in ("pairs", "budget")]
        widths = {v: max(m["width"] for m in mem[v]["micro_batches"]) for v in mem}
        actual = {v: 1 - sum(m["real"] for m in mem[v]["micro_batches"]) / sum(m["width"] for m in mem[v]["micro_batches"])
                  for v in mem}
        results["memory"] = dict(lengths=lengths, budget=budget, runs=mem, ratio=extra[1] / extra[0],
                                 width_ratio=widths["budget"] / widths["pairs"],
                                 step_seconds={v: mem[v]["steps"][0]["seconds"] for v in mem})
        print(f"[2] one train step, 8 sequences of {prompt} + {sorted(n - prompt for n in lengths)} tokens "
              f"(1 process, fp32):")
        for v, label in (("pairs", "fixed 2-sequence micro-batches"), ("budget", f"token budget {budget}")):
            m = mem[v]
            print(f"    {label:32s} {len(m['micro_batches'])} micro-batches of {widths[v]} slots, "
                  f"step peak over the state {m['steps'][0]['extra'] / mib:7.1f} MiB, step {m['steps'][0]['seconds']:.1f} s")
        print(f"    ratio budget / pairs {extra[1] / extra[0]:.3f} (target <= 0.6); widest micro-batch (slots) "
              f"{widths['budget'] / widths['pairs']:.3f}")

        optimum = padding_optimum(lengths, budget)
        layouts = {name: plan_padding(lengths, budget, **layout)["budget"] for name, layout in PADDING_LAYOUTS.items()}
        draws = [padding_over_draws(200 if q else 2000, n, prompt, low, high, budget, PADDING_LAYOUTS)
                 for n in (8, 32)]
        results["padding"] = dict(plan=plan, policy=actual, layouts=layouts, optimum_one_width=optimum, draws=draws)
        print(f"[3] padding under the token budget: the Policy's micro-batches (pp = 1) {actual['budget']:.2%} "
              f"(target <= 5%; widths {[m['width'] for m in mem['budget']['micro_batches']]}); fixed pairs "
              f"{actual['pairs']:.2%}")
        for name, p in layouts.items():
            print(f"    plan, {name:12s} {p['padding']:.2%} ({p['micro_batches']} micro-batches, widths {p['widths']})")
        print(f"    least possible with one width per step (any pipeline) {optimum:.2%}")
        for d in draws:
            print(f"    over {d['draws']} draws of {d['sequences']} lengths (median, 90th percentile, max, <= 5%):")
            for name, v in d["layouts"].items():
                best = f", the least possible at one width reached in {v['at_optimum']:.0%}" if v["at_optimum"] is not None else ""
                print(f"      {name:12s} {v['median']:.2%}, {v['p90']:.2%}, {v['max']:.2%}, {v['at_most_5pct']:.0%}{best}")
            if d["optimum_median"] is not None:
                print(f"      least possible at one width: median {d['optimum_median']:.2%}")
            print(f"      fixed pairs at one width: median {d['pairs_one_width_median']:.2%}; widest micro-batch, "
                  f"budget / fixed pairs: median {d['width_ratio_median']:.3f}, 10th-90th percentile "
                  f"{d['width_ratio_p10']:.3f}-{d['width_ratio_p90']:.3f}, max {d['width_ratio_max']:.3f}, "
                  f"<= 0.6 in {d['width_ratio_at_most_0_6']:.0%}")
    results["seconds"] = time.perf_counter() - t_start
    print(f"total {results['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
