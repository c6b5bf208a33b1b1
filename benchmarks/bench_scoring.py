"""Benchmark of the scoring pass (pi_old, ``score``, the mismatch study): log-probs from the last
hidden states through GPTModel's ``output_processor`` (Megatron-Core >= 0.18; the logits formed a
chunk of response rows at a time) against the logits path (the model returns the logits of the
whole micro-batch). Both are measured in the same run, on the same model and batch:

1. peak extra memory of one forward-only pass over the batch (a fresh process per path, the peak
   resident set reset once the model and batch exist), hidden / logits;
2. time of one pass (median over alternating iterations in one process), hidden / logits;
3. the largest difference between the two paths' log-probs.

Usage: python benchmarks/bench_scoring.py [--quick] [--json OUT]   (needs Megatron-Core >= 0.18)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_hook import _env  # noqa: E402
from proc_memory import peak, reset_peak  # noqa: E402

PATHS = ("logits", "hidden")


def setup(vocab: int, length: int, prompt: int, sequences: int):
    """A one-process Megatron GPT (2 MoE layers, hidden 256) and packed micro-batches of 2 sequences."""
    from megatron_vespo.batch import Sample, build_micro_batch
    from megatron_vespo.mcore.model import MoEModelConfig, build_gpt_model, transformer_config
    from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel

    layout = Layout()
    initialize_model_parallel(layout)
    m = MoEModelConfig(vocab_size=vocab, hidden_size=256, num_layers=2, num_attention_heads=8, num_query_groups=4,
                       head_dim=32, ffn_hidden_size=1024, moe_ffn_hidden_size=256, num_experts=8,
                       moe_router_topk=2)
    model = build_gpt_model(m, transformer_config(m, layout)).eval()
    gen = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(0, vocab, (length,), generator=gen), prompt, 0.0, None)
               for _ in range(sequences)]
    micro_batches = [build_micro_batch(samples[i:i + 2], "packed") for i in range(0, sequences, 2)]
    return model, micro_batches


def score(model, micro_batches, path: str) -> list[torch.Tensor]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vespo.hook import make_scoring_step

    found = []
    step = make_scoring_step(lambda mb, rows, logp: found.append(logp.clone()), from_hidden=(path == "hidden"))
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter(micro_batches), model=[model],
                                    num_microbatches=len(micro_batches), seq_length=micro_batches[0].tokens.shape[1],
                                    micro_batch_size=1, forward_only=True)
    return found


def memory_probe(path: str, args) -> int:
    import psutil

    model, micro_batches = setup(args.vocab, args.length, args.prompt, args.sequences)
    baseline = psutil.Process().memory_info().rss
    reset_peak()
    score(model, micro_batches, path)
    return peak() - baseline


def run_memory(args) -> dict:
    results = {}
    for path in PATHS:
        cmd = [sys.executable, __file__, "--memory-probe", path, "--vocab", str(args.vocab), "--length",
               str(args.length), "--prompt", str(args.prompt), "--sequences", str(args.sequences)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        results[path] = int(proc.stdout.strip().splitlines()[-1])
    return results


def run_times(args, iterations: int):
    model, micro_batches = setup(args.vocab, args.length, args.prompt, args.sequences)
    times = {path: [] for path in PATHS}
    outputs = {}
    for i in range(iterations + 1):
        for path in (PATHS if i % 2 == 0 else PATHS[::-1]):
            start = time.perf_counter()
            outputs[path] = score(model, micro_batches, path)
            if i:  # the first round warms up
                times[path].append(time.perf_counter() - start)
    difference = max(float((a - b).abs().max()) for a, b in zip(outputs["hidden"], outputs["logits"]))
    return {path: statistics.median(values) for path, values in times.items()}, difference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations, a smaller vocabulary")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--memory-probe", choices=PATHS)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence (not scored)")
    parser.add_argument("--sequences", type=int, default=4)
    args = parser.parse_args()
    if args.quick:
        args.vocab = min(args.vocab, 16384)
    if args.memory_probe:
        print(memory_probe(args.memory_probe, args))
        return 0

    from megatron_vespo.mcore import versions

    if not versions.has_output_processor():
        print(f"megatron-core {versions.mcore_version()} has no GPTModel output_processor (0.18+): nothing to compare")
        return 1
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    iterations = 3 if args.quick else 6
    tokens_per_mb = 2 * args.length
    logits_bytes = tokens_per_mb * args.vocab * 4
    print(f"torch {torch.__version__}, megatron-core {versions.mcore_version()}, {torch.get_num_threads()} threads; "
          f"{args.sequences} x {args.length} tokens ({args.prompt} prompt), 2 per micro-batch, vocab {args.vocab}: "
          f"{logits_bytes / 2**20:.0f} MiB of fp32 logits per micro-batch")
    mem = run_memory(args)
    mem_ratio = mem["hidden"] / mem["logits"]
    print(f"[1] peak extra memory of a pass: hidden {mem['hidden'] / 2**20:.0f} MiB, logits "
          f"{mem['logits'] / 2**20:.0f} MiB, ratio {mem_ratio:.3f}")
    times, difference = run_times(args, iterations)
    time_ratio = times["hidden"] / times["logits"]
    print(f"[2] time of a pass: hidden {times['hidden']:.3f} s, logits {times['logits']:.3f} s, ratio {time_ratio:.3f}")
    print(f"[3] largest |log p| difference between the paths: {difference:.2e}")
    results = dict(memory_bytes=mem, memory_ratio=mem_ratio, seconds=times, time_ratio=time_ratio,
                   max_abs_difference=difference, vocab=args.vocab, length=args.length, prompt=args.prompt,
                   sequences=args.sequences, logits_bytes_per_micro_batch=logits_bytes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
