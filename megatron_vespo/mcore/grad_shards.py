"""Which part of each parameter's reduced gradient a rank holds.

Without the distributed optimizer every data-parallel rank holds every parameter's whole reduced
gradient (an all-reduce). With it, Megatron's DDP reduce-scatters each gradient bucket: rank r of
the bucket's data-parallel group holds the r-th equal slice of the bucket, and the rest of its
buffer keeps its own unreduced gradients. Readers of gradients (per-group norms, the exactness
checks) use only the owned elements and sum over the data-parallel group.
"""

from __future__ import annotations


def owned_gradient_slices(models) -> dict | None:
    """{parameter: (first, last) flat element range of its ``main_grad`` that holds the reduced
    gradient on this rank} for Megatron DDP chunks with the distributed optimizer; None when every
    rank holds whole gradients. A parameter outside this rank's slices maps to an empty range."""
    ddps = [m for m in models if getattr(getattr(m, "ddp_config", None), "use_distributed_optimizer", False)]
    if not ddps:
        return None
    owned = {}
    for ddp in ddps:
        for buffer in list(ddp.buffers) + list(ddp.expert_parallel_buffers):
            size = buffer.data_parallel_group.size()
            rank = buffer.data_parallel_group.rank()
            for param, (start, end, bucket_id) in buffer.param_index_map.items():
                bucket = buffer.buckets[bucket_id]
                shard = bucket.grad_data.numel() // size
                low = bucket.offset + rank * shard
                high = low + shard
                first, last = max(start, low), min(end, high)
                owned[param] = (first - start, last - start) if first < last else (0, 0)
    return owned
