"""One parity launch: run under torchrun (or alone for world size 1).

For a seeded tiny MoE GPT and a seeded batch it runs Megatron-Core's real forward/backward
(``get_forward_backward_func()``, DDP, ``finalize_model_grads``) with the VESPO hook for each
(batch format, loss) pair and compares the loss and EVERY parameter gradient on EVERY rank,
replicated parameters included, with the plain-PyTorch reference. Rank 0 writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import asdict

import torch

from megatron_vespo import comm
from megatron_vespo.batch import Sample, build_micro_batch, partition, slice_for_cp, validate_samples
from megatron_vespo.losses import LossConfig
from megatron_vespo.mcore.grad_shards import owned_gradient_slices
from megatron_vespo.mcore.model import MoEModelConfig
from megatron_vespo.parity.reference import ReferenceMoE, init_hf_state, reference_loss


def tiny_model_config() -> MoEModelConfig:
    """4 layers (one dense, to cover mixed stacks), 8 experts top-2, GQA, q/k norms."""
    return MoEModelConfig(
        vocab_size=256, hidden_size=48, num_layers=4, num_attention_heads=4, num_query_groups=2,
        head_dim=12, ffn_hidden_size=64, moe_ffn_hidden_size=24, num_experts=8, moe_router_topk=2,
        dense_layers=(0,), rope_theta=10000.0, rms_norm_eps=1e-6,
    )


def make_samples(ref: ReferenceMoE, n: int, seed: int, untrained: int = 0) -> list[Sample]:
    """Uneven prompt/response lengths, advantages of both signs, and a non-trivial pi_old, engine
    and reference-policy log-probs around the current policy (half the sequences nearly
    on-policy); the last ``untrained`` samples are not trained (Sample.trained)."""
    gen = torch.Generator().manual_seed(seed + 1)
    m = ref.m
    samples = []
    for i in range(n):
        prompt = int(torch.randint(2, 9, (1,), generator=gen))
        response = int(torch.randint(1, 23, (1,), generator=gen))
        tokens = torch.randint(0, m.vocab_size, (prompt + response,), generator=gen)
        sign = 1.0 if i % 2 == 0 else -1.0
        adv = sign * (0.2 + float(torch.rand((), generator=gen)))
        samples.append(Sample(tokens=tokens, prompt_len=prompt, advantage=adv, old_logprobs=None))
    with torch.no_grad():
        for i, s in enumerate(samples):
            current = ref.response_logprobs(s)
            scale = 0.3 if i % 4 < 2 else 1e-5
            old = current + scale * torch.randn(current.shape, generator=gen)
            s.old_logprobs = old.clamp(max=0.0)
            s.engine_logprobs = (old + 0.1 * torch.randn(current.shape, generator=gen)).clamp(max=0.0)
    # drawn after the others, so the other inputs are those of earlier reports
    with torch.no_grad():
        for s in samples:
            s.ref_logprobs = (ref.response_logprobs(s) + 0.2 * torch.randn(s.response_len, generator=gen)).clamp(max=0.0)
    for s in samples[n - untrained:] if untrained else []:
        s.trained = False
    return samples


def reference_results(m: MoEModelConfig, seed: int, samples, micro_batches, cfg: LossConfig):
    # fp64: the yardstick should carry no rounding error of its own worth measuring.
    state = {k: v.double().requires_grad_(True) for k, v in init_hf_state(m, seed).items()}
    loss = reference_loss(ReferenceMoE(m, state), samples, micro_batches, cfg)
    loss.backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)).detach() for k, v in state.items()}
    return float(loss), grads


def swap_two_experts(state: dict[str, torch.Tensor], m: MoEModelConfig) -> None:
    """Negative control: exchange experts 0 and 1 of the last MoE layer (a typical mapping bug)."""
    layer = max(i for i in range(m.num_layers) if i not in m.dense_layers)
    for proj in ("gate", "up", "down"):
        a = f"model.layers.{layer}.mlp.experts.0.{proj}_proj.weight"
        b = f"model.layers.{layer}.mlp.experts.1.{proj}_proj.weight"
        state[a], state[b] = state[b], state[a]


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """|actual - expected| / |expected|, compared on the host (a GPU gradient against the CPU reference)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (actual - expected).norm().item()
    scale = expected.norm().item()
    if scale < 1e-12:
        return 0.0 if diff < 1e-12 else math.inf
    return diff / scale


def build_megatron(args, layout, m: MoEModelConfig):
    """The GPT chunk of this rank with the seeded weights, wrapped in Megatron's DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    from megatron_vespo.mcore.model import build_gpt_model, transformer_config
    from megatron_vespo.mcore.weights import ShardContext, load_hf_state

    config = transformer_config(m, layout, moe_token_dispatcher_type=args.dispatcher)
    gpt = build_gpt_model(m, config)
    ctx = ShardContext.from_model(gpt, m)
    weights = init_hf_state(m, args.seed)
    if args.negative_control:
        swap_two_experts(weights, m)
    load_hf_state(gpt, weights, ctx)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                      use_distributed_optimizer=getattr(args, "distributed_optimizer", False)),
        gpt,
    )
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return gpt, ddp, ctx


def worst_gradient(gpt, ref_grads, ctx, owned=None) -> tuple[float, str]:
    """Largest relative difference of this rank's reduced gradients from the reference's slices
    (``owned``, with the distributed optimizer: only the elements this rank holds reduced)."""
    from megatron_vespo.mcore.weights import local_tensor

    worst_name, worst = "", 0.0
    for name, param in gpt.named_parameters():
        grad = param.main_grad if getattr(param, "main_grad", None) is not None else param.grad
        expected = local_tensor(name, ref_grads, ctx)
        if owned is not None:
            first, last = owned[param]
            if first == last:
                continue
            grad, expected = grad.reshape(-1)[first:last], expected.reshape(-1)[first:last]
        diff = relative_difference(grad, expected)
        if diff > worst or not math.isfinite(diff):
            worst_name, worst = name, diff
    return worst, worst_name


def run(args) -> dict | None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vespo.hook import CP_TAG, HookGroups, make_forward_step, reduce_metrics
    from megatron_vespo.logprobs import TP_TAG
    from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel

    layout = Layout.parse(args.layout)
    m = tiny_model_config()
    m.check_layout(layout)
    initialize_model_parallel(layout, seed=args.seed)
    gpt, ddp, ctx = build_megatron(args, layout, m)

    rank = torch.distributed.get_rank()
    samples = None
    if rank == 0:
        samples = make_samples(ReferenceMoE(m, init_hf_state(m, args.seed)), args.samples, args.seed,
                               args.untrained)
        validate_samples(samples, m.vocab_size, need_engine=True)
    samples = comm.broadcast_object(samples)

    cp, cp_rank = layout.cp, ps.get_context_parallel_rank()
    plan = partition(len(samples), ps.get_data_parallel_world_size(), args.microbatches)
    all_micro_batches = [ids for rank_plan in plan for ids in rank_plan]
    seq_multiple = 2 * cp if cp > 1 else 1
    total_multiple = seq_multiple * layout.tp  # sequence parallelism splits the tokens over TP
    groups = HookGroups.from_parallel_state()
    rows, references = [], {}
    for fmt in args.formats.split(","):
        def build(ids, pad_to=None):
            return build_micro_batch([samples[i] for i in ids], fmt, seq_multiple, total_multiple, ids, pad_to)

        pad_to = None
        if args.dispatcher == "allgather":  # every rank must hold the same number of tokens
            pad_to = max(build(ids).tokens.shape[1] for ids in all_micro_batches)
        local = [slice_for_cp(build(ids, pad_to), cp, cp_rank) for ids in plan[ps.get_data_parallel_rank()]]
        for loss_name in args.losses.split(","):
            cfg = LossConfig(name=loss_name, correction=args.correction, aggregation=args.aggregation,
                             temperature=args.temperature, bypass=args.bypass, kl_coef=args.kl_coef,
                             kl_estimator=args.kl_estimator, entropy_coef=args.entropy_coef).validate()
            ddp.zero_grad_buffer()
            counted = {tag: comm.COUNTER[tag] for tag in (TP_TAG, CP_TAG)}
            start = time.perf_counter()
            losses_reduced = get_forward_backward_func()(
                forward_step_func=make_forward_step(cfg, groups),
                data_iterator=iter(local),
                model=[ddp],
                num_microbatches=len(local),
                seq_length=local[0].tokens.shape[1] * cp,
                micro_batch_size=local[0].tokens.shape[0],
                forward_only=False,
            )
            step_s = time.perf_counter() - start
            hook_calls = {tag: (comm.COUNTER[tag] - counted[tag]) / len(local) for tag in counted}
            metrics = reduce_metrics(losses_reduced)
            if rank == 0 and loss_name not in references:  # the same for every batch format
                references[loss_name] = reference_results(m, args.seed, samples, all_micro_batches, cfg)
            ref_loss, ref_grads = comm.broadcast_object(references.get(loss_name))
            worst, worst_name = worst_gradient(gpt, ref_grads, ctx, owned_gradient_slices([ddp]))
            calls = hook_calls if ps.is_pipeline_last_stage() else None
            per_rank = comm.gather_objects((worst, worst_name, rank, calls))
            if rank == 0:
                worst_all = max(per_rank, key=lambda r: r[:2])
                calls = [r[3] for r in per_rank if r[3] is not None]
                rows.append(dict(
                    layout=str(layout), format=fmt, loss=loss_name, ref_loss=ref_loss,
                    megatron_loss=metrics["policy_loss"],
                    loss_rel_diff=abs(metrics["policy_loss"] - ref_loss) / max(abs(ref_loss), 1e-12),
                    grad_rel_diff=worst_all[0], worst_param=f"rank{worst_all[2]}:{worst_all[1]}",
                    step_seconds=step_s, metrics=metrics, batch_sequences=len(samples),
                    batch_response_tokens=sum(s.response_len for s in samples if s.trained),
                    hook_collectives_per_microbatch={
                        "tp_logprobs_all_gather": max(c[TP_TAG] for c in calls),
                        "cp_sequence_stats_all_reduce": max(c[CP_TAG] for c in calls),
                    },
                ))
    if rank == 0:
        return dict(layout=str(layout), world_size=layout.world_size, rows=rows, model=asdict(m))
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layout", required=True)
    parser.add_argument("--losses", default="vespo")
    parser.add_argument("--formats", default="padded,packed")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--correction", default="none")
    parser.add_argument("--aggregation", default="token_mean")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--bypass", action="store_true")
    parser.add_argument("--kl-coef", type=float, default=0.0)
    parser.add_argument("--kl-estimator", default="k3")
    parser.add_argument("--entropy-coef", type=float, default=0.0)
    parser.add_argument("--untrained", type=int, default=0)
    parser.add_argument("--negative-control", action="store_true")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--dispatcher", default="alltoall", choices=["alltoall", "allgather"])
    parser.add_argument("--json-out", required=True)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="megatron")
    finish(run(args), args.json_out)
    return 0


def finish(report: dict | None, json_out: str) -> None:
    """Rank 0 writes the report (the other ranks have none); every rank leaves the process group."""
    if report is not None:
        with open(json_out, "w") as f:
            json.dump(report, f, indent=1)
    comm.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
