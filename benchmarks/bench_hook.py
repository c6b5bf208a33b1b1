"""Benchmark of the VESPO loss hook, every number a ratio against a baseline measured in the same run.

1. Train-step time (Megatron forward/backward + Adam) with the VESPO hook / with Megatron's own
   vocab-parallel cross-entropy (GPTModel's ``labels`` path) on the same model, layout and batch.
   Target <= 1.02.
2. Collectives the hook adds per micro-batch, counted under a tp2cp2 layout.
3. Peak extra memory of the log-prob path (forward + backward) / naive
   ``log_softmax(logits.float())`` at a long sequence and a 151936 vocabulary. Target <= 0.25.
4. Cost of the CPU compatibility layer's TorchFunctionMode (model forward+backward with / without).

Usage: python benchmarks/bench_hook.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from proc_memory import peak, reset_peak  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def bench_model_config():
    from megatron_vespo.mcore.model import MoEModelConfig

    return MoEModelConfig(vocab_size=8192, hidden_size=256, num_layers=4, num_attention_heads=8,
                          num_query_groups=4, head_dim=32, ffn_hidden_size=1024, moe_ffn_hidden_size=256,
                          num_experts=8, moe_router_topk=2)


def make_batch(m, n_seq=8, length=256, prompt=32, seed=0):
    from megatron_vespo.batch import Sample

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n_seq):
        tokens = torch.randint(0, m.vocab_size, (length,), generator=gen)
        old = -torch.rand(length - prompt, generator=gen) * 5
        samples.append(Sample(tokens, prompt, 1.0 if i % 2 else -1.0, old, old - 0.01))
    return samples


def train_step_times(iterations: int, fmt: str = "packed"):
    """Alternate VESPO-hook and cross-entropy steps on one model; return median seconds each."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vespo.batch import build_micro_batch
    from megatron_vespo.hook import make_forward_step
    from megatron_vespo.losses import LossConfig
    from megatron_vespo.mcore.model import build_gpt_model, transformer_config
    from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel

    layout = Layout()
    initialize_model_parallel(layout)
    m = bench_model_config()
    config = transformer_config(m, layout)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  build_gpt_model(m, config))
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5), [ddp])
    samples = make_batch(m)
    micro_batches = [build_micro_batch(samples[i:i + 4], fmt) for i in (0, 4)]
    seq_length, mbs = micro_batches[0].tokens.shape[1], micro_batches[0].tokens.shape[0]

    def cross_entropy_step(data_iterator, model):
        mb = next(data_iterator)
        per_token = model(mb.tokens, mb.position_ids, None, labels=mb.labels,
                          packed_seq_params=mb.packed_seq_params())

        def loss_func(output):
            mask = mb.loss_mask
            total = (output.float() * mask).sum()
            return total, mask.sum().int(), {"loss": torch.stack([total.detach(), mask.sum()])}

        return per_token, loss_func

    steps = {"vespo_hook": make_forward_step(LossConfig(name="vespo")), "cross_entropy": cross_entropy_step}
    times = {name: [] for name in steps}
    for i in range(iterations + 2):
        for name, step in (steps.items() if i % 2 == 0 else reversed(list(steps.items()))):
            start = time.perf_counter()
            ddp.zero_grad_buffer()
            opt.zero_grad()
            get_forward_backward_func()(forward_step_func=step, data_iterator=iter(micro_batches), model=[ddp],
                                        num_microbatches=2, seq_length=seq_length, micro_batch_size=mbs,
                                        forward_only=False)
            opt.step()
            if i >= 2:  # warm-up excluded
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, ddp, micro_batches


def mode_overhead(ddp, micro_batches, iterations: int):
    """Forward+backward of the bare model with the CUDA->CPU TorchFunctionMode active and not."""
    from megatron_vespo.mcore import cpu

    model = ddp.module
    mb = micro_batches[0]

    def run():
        start = time.perf_counter()
        out = model(mb.tokens, mb.position_ids, None, labels=mb.labels, packed_seq_params=mb.packed_seq_params())
        out.float().mean().backward()
        return time.perf_counter() - start

    on, off = [], []
    for i in range(iterations + 1):
        t_on = run()
        cpu._MODE.__exit__(None, None, None)
        try:
            t_off = run()
        finally:
            cpu._MODE.__enter__()
        if i:
            on.append(t_on)
            off.append(t_off)
    return statistics.median(on), statistics.median(off)


def memory_probe(kind: str, tokens: int, vocab: int) -> int:
    """Peak extra bytes of one log-prob forward+backward over bf16 logits, measured in this
    fresh process from the kernel's peak RSS, reset once the logits exist."""
    import psutil

    from megatron_vespo.logprobs import vocab_parallel_logprobs

    gen = torch.Generator().manual_seed(0)
    # logits = hidden @ W^T as in a model's output layer: the logits are a non-leaf whose
    # gradient flows on into small tensors, and they exist before the baseline is read.
    hidden = torch.randn(tokens, 64, generator=gen).to(torch.bfloat16).requires_grad_(True)
    weight = (0.3 * torch.randn(vocab, 64, generator=gen)).to(torch.bfloat16).requires_grad_(True)
    logits = hidden @ weight.T
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    rows = torch.arange(tokens)
    baseline = psutil.Process().memory_info().rss
    reset_peak()
    if kind == "naive":
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    else:
        # "hook" is the hook's own setting: the gradient reuses the logits' memory
        logp, _ = vocab_parallel_logprobs(logits, rows, targets, inplace_grad=(kind == "hook"))
    del logits  # the model keeps no other reference either
    logp.sum().backward()
    return peak() - baseline


def run_memory(tokens: int, vocab: int) -> dict:
    results = {}
    for kind in ("naive", "hook", "hook_without_inplace_grad"):
        proc = subprocess.run([sys.executable, __file__, "--memory-probe", kind, "--tokens", str(tokens),
                               "--vocab", str(vocab)], capture_output=True, text=True, env=_env())
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        results[kind] = int(proc.stdout.strip().splitlines()[-1])
    return results


def run_collective_count() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "p.json")
        proc = subprocess.run([sys.executable, "-m", "megatron_vespo", "parity", "--layouts", "tp2cp2",
                               "--losses", "vespo,gmpo", "--formats", "packed", "--json", out],
                              capture_output=True, text=True, env=_env(), cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
        rows = json.load(open(out))["rows"]
    return {row["loss"]: row["hook_collectives_per_microbatch"] for row in rows}


def _env():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations, shorter sequence")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--memory-probe", choices=["naive", "hook", "hook_without_inplace_grad"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    args = parser.parse_args()
    if args.memory_probe:
        print(memory_probe(args.memory_probe, args.tokens, args.vocab))
        return 0

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    iterations = 3 if args.quick else 8
    tokens = 1024 if args.quick else args.tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CUDA {torch.cuda.is_available()}")

    print("[1] train step (4-layer MoE, 8 experts top-2, vocab 8192, 8 x 256 tokens in 2 micro-batches, 1 process):")
    padded, _, _ = train_step_times(iterations, "padded")
    times, ddp, micro_batches = train_step_times(iterations, "packed")
    ratio = times["vespo_hook"] / times["cross_entropy"]
    padded_ratio = padded["vespo_hook"] / padded["cross_entropy"]
    print(f"    packed (THD): vespo hook {times['vespo_hook']:.3f} s, cross-entropy {times['cross_entropy']:.3f} s, "
          f"ratio {ratio:.3f} (target <= 1.02)")
    print(f"    padded [4, 256]: vespo hook {padded['vespo_hook']:.3f} s, cross-entropy {padded['cross_entropy']:.3f} s, "
          f"ratio {padded_ratio:.3f} (GPTModel copies [b, s, V] logits to batch-first when b > 1)")

    on, off = mode_overhead(ddp, micro_batches, iterations)
    print(f"[4] CPU TorchFunctionMode: model fwd+bwd {on:.3f} s with / {off:.3f} s without, ratio {on / off:.3f}")

    calls = run_collective_count()
    print(f"[2] collectives the hook adds per micro-batch under tp2cp2: {json.dumps(calls)}")

    mem = run_memory(tokens, args.vocab)
    mem_ratio = mem["hook"] / mem["naive"]
    print(f"[3] log-prob path peak extra memory, {tokens} tokens x {args.vocab} vocab, bf16 logits "
          f"({tokens * args.vocab * 2 / 2**30:.2f} GiB):")
    print(f"    hook {mem['hook'] / 2**30:.2f} GiB, naive log_softmax(logits.float()) {mem['naive'] / 2**30:.2f} GiB, "
          f"ratio {mem_ratio:.3f} (target <= 0.25); without the in-place gradient "
          f"{mem['hook_without_inplace_grad'] / 2**30:.2f} GiB, ratio "
          f"{mem['hook_without_inplace_grad'] / mem['naive']:.3f}")
    results = dict(train_step_seconds=times, train_step_ratio=ratio, padded_train_step_seconds=padded,
                   padded_train_step_ratio=padded_ratio, mode_overhead_ratio=on / off,
                   hook_collectives_per_microbatch=calls, memory_bytes=mem, memory_ratio=mem_ratio,
                   tokens=tokens, vocab=args.vocab)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
