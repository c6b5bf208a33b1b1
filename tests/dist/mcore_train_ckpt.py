"""Megatron-Core on CPU end to end: DDP + get_megatron_optimizer steps with the VESPO hook,
then dist_checkpointing save under one layout and load (resharded) under another.

  --phase save:    train 2 steps under --layout, save the model to --ckpt
  --phase compare: train the same 2 steps under --layout, load --ckpt into a fresh model and
                   check every parameter equals this run's (layout-independent optimizer steps
                   plus a resharding round trip). Prints the losses as JSON.
"""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402


def build(layout_text, seed=1234):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_vespo.mcore.model import build_gpt_model, transformer_config
    from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel
    from megatron_vespo.mcore.weights import ShardContext, load_hf_state
    from megatron_vespo.parity.reference import init_hf_state
    from megatron_vespo.parity.worker import tiny_model_config

    layout = Layout.parse(layout_text)
    m = tiny_model_config()
    initialize_model_parallel(layout, seed=seed)
    config = transformer_config(m, layout)
    gpt = build_gpt_model(m, config)
    ctx = ShardContext.from_model(gpt, m)
    load_hf_state(gpt, init_hf_state(m, seed), ctx)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False), gpt)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=1.0,
                                                 use_distributed_optimizer=False), [ddp])
    return layout, m, config, gpt, ddp, opt


def train(layout, m, gpt, ddp, opt, steps=2):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vespo import comm
    from megatron_vespo.batch import build_micro_batch, partition, slice_for_cp
    from megatron_vespo.hook import make_forward_step, reduce_metrics
    from megatron_vespo.losses import LossConfig
    from megatron_vespo.parity.reference import ReferenceMoE, init_hf_state
    from megatron_vespo.parity.worker import make_samples

    samples = None
    if torch.distributed.get_rank() == 0:
        samples = make_samples(ReferenceMoE(m, init_hf_state(m, 1234)), 8, 1234)
    samples = comm.broadcast_object(samples)
    plan = partition(len(samples), ps.get_data_parallel_world_size(), 2)[ps.get_data_parallel_rank()]
    cp = layout.cp
    losses = []
    for _ in range(steps):
        local = [slice_for_cp(build_micro_batch([samples[i] for i in ids], "packed", 2 * cp if cp > 1 else 1,
                                                (2 * cp if cp > 1 else 1) * layout.tp, ids), cp,
                              ps.get_context_parallel_rank()) for ids in plan]
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=make_forward_step(LossConfig(name="vespo")), data_iterator=iter(local),
            model=[ddp], num_microbatches=len(local), seq_length=local[0].tokens.shape[1] * cp,
            micro_batch_size=1, forward_only=False)
        ok, grad_norm, _ = opt.step()
        assert ok and grad_norm is not None and grad_norm > 0, (ok, grad_norm)
        losses.append(reduce_metrics(out)["policy_loss"])
    return losses


def main():
    from megatron.core import dist_checkpointing

    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--phase", choices=["save", "compare"], required=True)
    args = parser.parse_args()
    layout, m, config, gpt, ddp, opt = build(args.layout)
    losses = train(layout, m, gpt, ddp, opt)
    if args.phase == "save":
        dist_checkpointing.save(gpt.sharded_state_dict(), args.ckpt)
    else:
        from megatron_vespo.mcore.model import build_gpt_model, transformer_config

        # a clean config: the training one now holds DDP hooks, which cannot be deep-copied
        fresh = build_gpt_model(m, transformer_config(m, layout))
        state = dist_checkpointing.load(fresh.sharded_state_dict(), args.ckpt)
        fresh.load_state_dict(state)
        trained = dict(gpt.named_parameters())
        worst = 0.0
        for name, param in fresh.named_parameters():
            ref = trained[name].detach()
            worst = max(worst, ((param.detach() - ref).norm() / ref.norm()).item())
        assert worst < 1e-5, f"loaded checkpoint differs from this layout's training by {worst:.2e}"
        if torch.distributed.get_rank() == 0:
            print("CKPT_COMPARE", json.dumps({"losses": losses, "worst": worst}))
    if torch.distributed.get_rank() == 0:
        print("LOSSES", json.dumps(losses))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
