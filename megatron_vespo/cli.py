"""The ``megatron-vespo`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def main(argv=None) -> int:
    # Megatron-Core warns at import about every optional GPU package it lacks; that is expected here.
    warnings.filterwarnings("ignore", module=r"megatron\.")
    parser = argparse.ArgumentParser(
        prog="megatron-vespo",
        description="VESPO policy optimisation for Mixture-of-Experts models on Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from megatron_vespo.parity import launcher

    parity = sub.add_parser(
        "parity",
        help="check the loss hook under parallel layouts against a single-process reference",
        description="For a seeded tiny MoE GPT and batch, run Megatron-Core's forward/backward "
        "with the policy-loss hook under each layout (torchrun on gloo) and compare the loss "
        "and every parameter gradient with a plain-PyTorch reference.",
    )
    launcher.add_arguments(parity)
    parity.set_defaults(func=launcher.run_parity)

    from megatron_vespo import score
    from megatron_vespo.convert import cli as convert_cli
    from megatron_vespo.train.checkpoints import model_checkpoint

    # convert reads trainer checkpoints through the trainer's own reader: convert does not import train
    convert_cli.add_commands(sub, trainer_checkpoint=model_checkpoint)
    score.add_command(sub)

    from megatron_vespo.rollout import launch, serve_local

    serve = sub.add_parser(
        "serve-local",
        help="serve a Hugging Face model over SGLang's HTTP protocol on CPU (tests, demo)",
        description="A local engine that speaks the SGLang 0.5.23 protocol subset rollouts use "
        "(/generate with log-probs and routed experts, health, model/server info, pause/continue, "
        "abort, flush, weight updates), backed by a transformers model with a KV cache.",
    )
    serve_local.add_arguments(serve)
    serve.set_defaults(func=serve_local.main)

    from megatron_vespo.train import demo, trainer

    train = sub.add_parser(
        "train",
        help="VESPO RL of an MoE on Megatron-Core with SGLang-protocol rollouts (run under torchrun)",
        description="Rollout -> rewards -> group advantages -> pi_old -> N optimizer steps through the "
        "loss hook -> weight sync, from a YAML config plus section.key=value overrides.",
    )
    trainer.add_arguments(train)
    train.set_defaults(func=trainer.main)
    demo_parser = sub.add_parser(
        "demo", help="the CPU demo: a tiny Qwen3-MoE, a local engine and a few minutes of VESPO RL")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=demo.main)

    from megatron_vespo.train import evaluation

    evaluate = sub.add_parser(
        "eval",
        help="evaluate one model on the config's held-out sets: avg@n and pass@k per set",
        description="Generate eval.n samples of every prompt of the config's eval sets (eval.sets prompt files, "
                    "or eval.synthetic_prompts held-out synthetic prompts) with the local engine or the "
                    "configured SGLang servers, score them with data.reward and print avg@n, pass@k (the "
                    "unbiased estimator) and the response length per set; --json-out also writes them. The "
                    "sampling seeds are the training run's, so a trainer checkpoint gives what the run logged "
                    "at its step (up to the engine's batching in bf16).",
    )
    evaluation.add_arguments(evaluate)
    evaluate.set_defaults(func=evaluation.main)

    from megatron_vespo.train import mismatch_study

    study = sub.add_parser(
        "mismatch",
        help="measure the training-inference mismatch: engine rollouts scored by Megatron-Core, with and "
             "without R3 routing replay",
        description="Generate rollouts with the engine (routed experts on), score the same tokens with the "
                    "Megatron-Core model in any layout, and report per-token |delta logp|, k1/k2/k3 KL, "
                    "sequence log W against length (with VESPO's phi effectively zero), and routing agreement "
                    "per MoE layer; with --r3 all of it again under routing replay. Writes report.json and "
                    "PNG plots to --out.",
    )
    mismatch_study.add_arguments(study)
    study.set_defaults(func=mismatch_study.main)

    from megatron_vespo import plan

    plan_parser = sub.add_parser(
        "plan",
        help="per-GPU memory of the trainer (parameters, gradients, optimizer, activations, log-prob path) "
             "for a model, layout and micro-batch size, and whether it fits",
        description="Count the bytes the most loaded rank holds in a training step: parameters, fp32 main "
                    "gradients, Adam state (sharded with --distributed-optimizer), the activations of the "
                    "micro-batches in flight (or only layer inputs with --recompute full) and the log-prob "
                    "path (logits, workspace, output-layer backward); formulas in megatron_vespo/plan.py and "
                    "docs/PLAN.md. Nothing is started: config.json is all it reads.",
    )
    plan.add_arguments(plan_parser)
    plan_parser.set_defaults(func=plan.main)

    sglang = sub.add_parser("sglang", help="manage SGLang servers and the sglang-router")
    sglang_sub = sglang.add_subparsers(dest="sglang_command", required=True)
    launch_parser = sglang_sub.add_parser(
        "launch",
        help="start SGLang servers (SLURM-aware) and a router in front; stop them cleanly on exit",
    )
    launch.add_arguments(launch_parser)
    launch_parser.set_defaults(func=launch.main)

    from megatron_vespo.launcher import ARGV_ENV

    if argv is None and not sys.argv[1:] and ARGV_ENV in os.environ:
        argv = json.loads(os.environ.pop(ARGV_ENV))  # a rank started by run_distributed
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # commands that start torchrun re-run themselves with the same arguments
    try:
        return args.func(args)
    # bad input and an environment that refuses it (OSError: a file that cannot be read or written,
    # a port taken, a server unreachable): one line naming it, not a traceback
    except (ValueError, KeyError, OSError) as err:
        print(f"megatron-vespo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
