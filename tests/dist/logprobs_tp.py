"""Vocab-parallel log-probs under a real TP group vs the full-vocabulary computation."""

import torch
import torch.distributed as dist

from megatron_vespo import comm
from megatron_vespo.logprobs import vocab_parallel_logprobs

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
gen = torch.Generator().manual_seed(7)
vocab, positions = 64 * world, 40
full = 4 * torch.randn(positions, vocab, generator=gen)
rows = torch.randperm(positions, generator=gen)[:25].sort().values
targets = torch.randint(0, vocab, (rows.numel(),), generator=gen)
weights = torch.randn(rows.numel(), generator=gen)

shard = full.chunk(world, dim=1)[rank].clone().requires_grad_(True)
from megatron_vespo.logprobs import TP_TAG

before = comm.COUNTER[TP_TAG]
logp, entropy = vocab_parallel_logprobs(shard, rows, targets, vocab_start=rank * 64,
                                        temperature=0.8, group=dist.group.WORLD, chunk_tokens=7)
assert comm.COUNTER[TP_TAG] - before == 1, "expected exactly one TP collective"
(logp * weights).sum().backward()

ref = full.clone().requires_grad_(True)
all_logp = torch.log_softmax(ref[rows] / 0.8, dim=-1)
ref_logp = all_logp.gather(1, targets.unsqueeze(1)).squeeze(1)
ref_entropy = -(all_logp.exp() * all_logp).sum(-1)
(ref_logp * weights).sum().backward()
torch.testing.assert_close(logp, ref_logp.detach(), rtol=1e-6, atol=2e-6)
torch.testing.assert_close(entropy, ref_entropy.detach(), rtol=1e-6, atol=2e-6)
torch.testing.assert_close(shard.grad, ref.grad.chunk(world, dim=1)[rank], rtol=1e-5, atol=1e-7)

# an entropy bonus: the entropy's gradient is local too (no further collective)
shard2 = full.chunk(world, dim=1)[rank].clone().requires_grad_(True)
before = comm.COUNTER[TP_TAG]
logp, entropy = vocab_parallel_logprobs(shard2 * 1.0, rows, targets, vocab_start=rank * 64, temperature=0.8,
                                        group=dist.group.WORLD, chunk_tokens=7, inplace_grad=True, entropy_grad=True)
(logp * weights + entropy * weights.flip(0)).sum().backward()
assert comm.COUNTER[TP_TAG] - before == 1, "expected exactly one TP collective with the entropy gradient"
ref2 = full.double().requires_grad_(True)
all_logp = torch.log_softmax(ref2[rows] / 0.8, dim=-1)
(all_logp.gather(1, targets.unsqueeze(1)).squeeze(1) * weights.double()
 - (all_logp.exp() * all_logp).sum(-1) * weights.flip(0).double()).sum().backward()
torch.testing.assert_close(shard2.grad.double(), ref2.grad.chunk(world, dim=1)[rank], rtol=1e-5, atol=1e-6)
dist.barrier()
if rank == 0:
    print("LOGPROBS_TP_OK")
dist.destroy_process_group()
