"""The router's load-balancing (aux) loss gradient under one layout, with the per-token loss the
hook uses: one training forward/backward of the VESPO hook where every advantage is 0 (the policy
loss gives no gradient), so the router weights' gradients are the aux loss's alone.

Usage: torchrun --nproc_per_node=N aux_loss.py --layout tp2 --out GRADS.pt [--coeff 0.01]
Rank 0 saves {parameter name: gradient} of every router weight (torch.save, read back with
weights_only=True).
"""

import argparse
import warnings
from types import SimpleNamespace

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from megatron_vespo.batch import build_micro_batch, partition  # noqa: E402
from megatron_vespo.hook import make_forward_step  # noqa: E402
from megatron_vespo.losses import LossConfig  # noqa: E402
from megatron_vespo.parity.reference import ReferenceMoE, init_hf_state  # noqa: E402
from megatron_vespo.parity.worker import build_megatron, make_samples, tiny_model_config  # noqa: E402

SEED = 7


def main() -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel

    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--coeff", type=float, default=0.01)
    args = parser.parse_args()

    m = tiny_model_config()
    m.moe_aux_loss_coeff = args.coeff
    torch.distributed.init_process_group("gloo")
    layout = Layout.parse(args.layout)
    initialize_model_parallel(layout, seed=SEED)
    gpt, ddp, _ = build_megatron(SimpleNamespace(dispatcher="alltoall", seed=SEED, negative_control=False), layout, m)

    samples = make_samples(ReferenceMoE(m, init_hf_state(m, SEED)), 8, SEED)
    for s in samples:
        s.advantage = 0.0
    plan = partition(len(samples), ps.get_data_parallel_world_size(), 2)[ps.get_data_parallel_rank()]
    # every layout gets the same tokens: totals padded to a multiple of 2 (sequence parallelism at tp2)
    micro_batches = [build_micro_batch([samples[i] for i in ids], "packed", 1, 2, ids) for ids in plan]
    ddp.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=make_forward_step(LossConfig(name="vespo")),
                                data_iterator=iter(micro_batches), model=[ddp], num_microbatches=len(micro_batches),
                                seq_length=micro_batches[0].tokens.shape[1], micro_batch_size=1, forward_only=False)
    grads = {}
    for name, param in gpt.named_parameters():
        if "router.weight" in name:
            grads[name] = (param.main_grad if getattr(param, "main_grad", None) is not None else param.grad).clone()
    if torch.distributed.get_rank() == 0:
        torch.save(grads, args.out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
