"""``megatron-vespo demo``: a tiny Qwen3-MoE learns a synthetic task with VESPO on a 2-core CPU.

1. Build the model (transformers, a few M parameters, every layer MoE with 8 experts top-2, as real
   Qwen3-MoE checkpoints and as SGLang's qwen3_moe builds it; no pad_token_id, so no embedding
   row starts at zero: PAD is an ordinary token the policy can emit, never part of an answer) and give
   it a short supervised warm start on the task, so rollouts start with some reward but far from
   all of it. Cached in the run's model directory (keyed by the settings below): a second run
   skips this.
2. Train with the config (examples/configs/demo_cpu.yaml): Megatron-Core on gloo, the local engine
   in bf16 (a real training-inference mismatch against the fp32 trainer), in-process weight sync,
   and every 25 rollout batches an evaluation on 64 held-out prompts (train/evaluation.py): the
   held-out curve in the plot and a ``held-out eval:`` line in the summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import torch

from megatron_vespo.train import tasks

MODEL_SETTINGS = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, intermediate_size=256, moe_intermediate_size=128, num_experts=8,
                      num_experts_per_tok=2, max_position_embeddings=64)
WARM_START = dict(steps=25, batch=64, lr=3e-3, seed=0)
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "examples", "configs", "demo_cpu.yaml")


MODEL_REVISION = 2  # 2: every layer MoE, no pad_token_id (1 had a dense first layer and a zero PAD row)


def _stamp(task_name: str, digits: tuple[int, int], warm_start: dict) -> str:
    text = json.dumps([MODEL_SETTINGS, warm_start, task_name, list(digits), MODEL_REVISION], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_model(directory: str, task_name: str = "reverse", log=print, digits: tuple[int, int] = (2, 6),
                warm_start_steps: int | None = None) -> str:
    """Create (or reuse) the warm-started tiny Qwen3-MoE in ``directory`` for prompts of
    ``digits`` = (min, max) digits, after ``warm_start_steps`` supervised steps (default
    WARM_START's)."""
    warm = dict(WARM_START, steps=WARM_START["steps"] if warm_start_steps is None else warm_start_steps)
    import transformers as tf

    stamp_file = os.path.join(directory, "demo_stamp.txt")
    stamp = _stamp(task_name, digits, warm)
    if os.path.isfile(stamp_file) and open(stamp_file, "rb").read().strip() == stamp.encode():  # else: rebuild
        log(f"model: reusing {directory}")
        return directory
    torch.manual_seed(warm["seed"])
    # pad_token_id stays unset: transformers would start that row at zero (nn.Embedding
    # padding_idx), a degenerate embedding for a token the engine can sample (check_embedding_rows)
    config = tf.Qwen3MoeConfig(vocab_size=tasks.SYNTHETIC_VOCAB, rms_norm_eps=1e-6, initializer_range=0.05,
                               decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                               tie_word_embeddings=False, bos_token_id=tasks.BOS, eos_token_id=tasks.EOS,
                               pad_token_id=None, **MODEL_SETTINGS)
    model = tf.Qwen3MoeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: tiny Qwen3-MoE, {n_params / 1e6:.2f} M parameters, {config.num_experts} experts top-"
        f"{config.num_experts_per_tok}; supervised warm start on '{task_name}' ({warm['steps']} steps)")
    # a seed of its own: the warm start never sees the RL stream's prompts
    task = tasks.SyntheticTask(task_name, min_digits=digits[0], max_digits=digits[1], seed=10_000)
    optimizer = torch.optim.Adam(model.parameters(), lr=warm["lr"])
    start = time.perf_counter()
    uid = 0
    for step in range(warm["steps"]):
        batch = [task.prompt(uid + i) for i in range(warm["batch"])]
        uid += warm["batch"]
        loss = _supervised_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 20 == 0:
            log(f"  warm start step {step + 1}: loss {loss.item():.3f}")
    model.generation_config.eos_token_id = tasks.EOS
    model.save_pretrained(directory)
    with open(stamp_file, "w") as f:
        f.write(stamp + "\n")
    log(f"model: saved to {directory} ({time.perf_counter() - start:.0f} s)")
    return directory


def _supervised_loss(model, batch) -> torch.Tensor:
    """Cross-entropy on the answer tokens (EOS included), prompts padded on the right."""
    rows = [p.input_ids + p.answer for p in batch]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tasks.PAD, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (p, row) in enumerate(zip(batch, rows)):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, len(p.input_ids):len(row)] = torch.tensor(p.answer)
    logits = model(ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--warm-start-steps", type=int, default=WARM_START["steps"],
                        help="supervised steps before RL (the model is cached per setting)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def main(args) -> int:
    from megatron_vespo.train.config import load_config
    from megatron_vespo.train.trainer import run_training

    cfg = load_config(args.config, args.overrides).validate()  # before minutes of building the model
    if cfg.data.task != "synthetic":
        raise ValueError("the demo runs a synthetic task (data.task = synthetic)")
    if args.warm_start_steps < 0:
        raise ValueError(f"--warm-start-steps must be >= 0, got {args.warm_start_steps}")
    build_model(cfg.model.hf_dir, cfg.data.synthetic_task, log=lambda m: print(m, file=sys.stderr, flush=True),
                digits=(cfg.data.synthetic_min_digits, cfg.data.synthetic_max_digits),
                warm_start_steps=args.warm_start_steps)
    return run_training(cfg)  # its last line of output: "run directory: PATH"
