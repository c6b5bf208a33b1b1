"""Cost of MoE routing replay, every number a ratio against the same work without it, same run.

On one Policy (Qwen3-MoE shaped: hidden 256, 4 layers (first dense), 8 experts top-2, vocab 8192;
fp32, 1 process), the same batch of random samples:

1. pi_old forward recording the routers' choices (R2's record pass) / plain pi_old forward.
2. pi_old forward replaying given routes (R3) / plain pi_old forward.
3. train step (forward, backward, Adam) replaying routes / plain train step.

Medians of interleaved repetitions after a warm-up. The mismatch study runs passes 1 and 2;
the trainer runs 1 (R2) or 2 (R3) once per rollout batch and 3 every step.

Usage: python benchmarks/bench_routing_replay.py [--samples 16] [--length 256] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_model(directory: str) -> None:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                               num_key_value_heads=4, head_dim=32, intermediate_size=1024, moe_intermediate_size=256,
                               num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0],
                               norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=4096)
    tf.Qwen3MoeForCausalLM(config).save_pretrained(directory)


def run(args) -> dict:
    from megatron_vespo.batch import Sample
    from megatron_vespo.mcore.parallel import Layout
    from megatron_vespo.train.config import TrainConfig
    from megatron_vespo.train.policy import Policy

    with tempfile.TemporaryDirectory() as directory:
        make_model(directory)
        cfg = TrainConfig()
        cfg.model.hf_dir = directory
        cfg.algorithm.routing_replay = "r2"
        cfg.algorithm.micro_batch_size = max(args.samples // 2, 1)
        policy = Policy(cfg, Layout())
    gen = torch.Generator().manual_seed(1)
    prompt = args.length // 4
    samples = []
    for _ in range(args.samples):
        tokens = torch.randint(0, 8192, (args.length,), generator=gen)
        samples.append(Sample(tokens=tokens, prompt_len=prompt, advantage=float(torch.randn(1, generator=gen)),
                              old_logprobs=None, engine_logprobs=None))
    for s, old in zip(samples, policy.logprobs(samples)[0]):
        s.old_logprobs = old
    _, routes = policy.logprobs(samples, record=True)  # the routes replayed below: the model's own
    ids = list(range(len(samples)))
    replay = policy.replay

    def plain_forward():
        policy.logprobs(samples)

    def record_forward():
        policy.logprobs(samples, record=True)

    def replay_forward():
        policy.logprobs(samples, replay=routes)

    def plain_step():
        policy.replay = None
        try:
            policy.train_step(samples, ids)  # no routes: replay is off
        finally:
            policy.replay = replay

    def replay_step():
        policy.train_step(samples, ids, routes)

    cases = {"plain_forward": plain_forward, "record_forward": record_forward, "replay_forward": replay_forward,
             "plain_step": plain_step, "replay_step": replay_step}
    times = {name: [] for name in cases}
    for name, fn in cases.items():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():  # interleaved: drift on a shared machine hits every case alike
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(values) for name, values in times.items()}
    return {"samples": args.samples, "length": args.length, "seconds": med,
            "record_vs_plain_forward": med["record_forward"] / med["plain_forward"],
            "replay_vs_plain_forward": med["replay_forward"] / med["plain_forward"],
            "replay_vs_plain_step": med["replay_step"] / med["plain_step"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    result = run(args)
    s = result["seconds"]
    print(f"{args.samples} samples x {args.length} tokens, 1 process (medians of {args.repeats})")
    print(f"  pi_old forward  plain {s['plain_forward']:.3f} s  record {s['record_forward']:.3f} s  "
          f"ratio {result['record_vs_plain_forward']:.3f}")
    print(f"  pi_old forward  plain {s['plain_forward']:.3f} s  replay {s['replay_forward']:.3f} s  "
          f"ratio {result['replay_vs_plain_forward']:.3f}")
    print(f"  train step      plain {s['plain_step']:.3f} s  replay {s['replay_step']:.3f} s  "
          f"ratio {result['replay_vs_plain_step']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
