"""Every cross-rank collective the project issues lives here.

Each function is a no-op for a group of size 1 (or ``None``), so single-process code pays nothing.
``COUNTER`` counts the collectives actually issued, by tag (what they are for), so benchmarks and
tests can state how many collectives the loss hook adds per micro-batch.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

COUNTER: Counter = Counter()


def group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def all_reduce_sum(tensor: torch.Tensor, group, tag: str = "all_reduce") -> torch.Tensor:
    """In-place SUM all-reduce (no autograd)."""
    if group_size(group) > 1:
        COUNTER[tag] += 1
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_stack(tensor: torch.Tensor, group, tag: str = "all_gather") -> torch.Tensor:
    """Gather equal-shaped tensors into [group_size, *shape] (no autograd)."""
    size = group_size(group)
    if size == 1:
        return tensor.unsqueeze(0)
    COUNTER[tag] += 1
    # gloo wants a flat [size * n] output; view it as [size, *shape] afterwards.
    out = tensor.new_empty(size * tensor.numel())
    dist.all_gather_into_tensor(out, tensor.contiguous().view(-1), group=group)
    return out.view(size, *tensor.shape)


class _AllGatherFirstDim(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward sums grads and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        ctx.length = tensor.shape[0]
        return all_gather_stack(tensor, group, tag="cp_attention_all_gather").flatten(0, 1)

    @staticmethod
    def backward(ctx, grad):
        size = group_size(ctx.group)
        out = grad.new_empty((ctx.length, *grad.shape[1:]))
        COUNTER["cp_attention_reduce_scatter"] += 1
        dist.reduce_scatter_tensor(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        assert out.shape[0] * size == grad.shape[0]
        return out, None


def all_gather_first_dim_with_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather along dim 0 (context-parallel K/V)."""
    if group_size(group) == 1:
        return tensor
    return _AllGatherFirstDim.apply(tensor, group)


def broadcast_(tensor: torch.Tensor, src_global_rank: int, group) -> torch.Tensor:
    if group_size(group) > 1:
        COUNTER["broadcast"] += 1
        dist.broadcast(tensor, src=src_global_rank, group=group)
    return tensor


def barrier(group=None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def gather_objects(obj, dst: int = 0) -> list | None:
    """Collect a picklable object from every rank of the world on ``dst``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_flat(values: torch.Tensor, meta, dst: int = 0) -> list | None:
    """Gather one flat tensor (lengths may differ) and a small picklable ``meta`` from every rank
    of the world on ``dst``: [(values, meta) per rank] there, None elsewhere."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [(values, meta)]
    metas = gather_objects(meta, dst=dst)
    lengths = torch.tensor([values.numel()], dtype=torch.int64)
    sizes = all_gather_stack(lengths, dist.group.WORLD, tag="export_sizes").reshape(-1).tolist()
    longest = max(sizes)
    padded = values.new_zeros(longest)
    padded[: values.numel()] = values
    COUNTER["export_gather"] += 1
    if dist.get_rank() == dst:
        out = [padded.new_empty(longest) for _ in sizes]
        dist.gather(padded, out, dst=dst)
        return [(t[:n], m) for t, n, m in zip(out, sizes, metas)]
    dist.gather(padded, None, dst=dst)
    return None
