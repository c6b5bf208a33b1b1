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


def all_reduce_max(tensor: torch.Tensor, group, tag: str = "all_reduce_max") -> torch.Tensor:
    """In-place MAX all-reduce (no autograd)."""
    if group_size(group) > 1:
        COUNTER[tag] += 1
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
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


def broadcast_object(obj, src: int = 0, group=None):
    """``obj`` of global rank ``src`` on every rank of ``group`` (default: the world)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class FlatTransfer:
    """An in-flight transfer of one flat tensor from every rank to ``dst`` (see :func:`send_flat_to`)."""

    def __init__(self, works, received, keep_alive):
        self._works, self._received, self._keep_alive = works, received, keep_alive

    def wait(self) -> list[torch.Tensor] | None:
        """Per-rank tensors on the destination (its own entry empty), None elsewhere."""
        for work in self._works:
            work.wait()
        self._keep_alive = None
        return self._received


def send_flat_to(values: torch.Tensor | None, sizes: list[int], dst: int = 0, tag: int = 0) -> FlatTransfer:
    """Start sending this rank's flat ``values`` to ``dst``, point to point and asynchronously.

    ``sizes[r]`` is the length rank r sends; every rank knows all of them beforehand (export plans
    are exchanged once), so no size or padding travels and nothing is copied. Several transfers can
    be in flight at once (distinct ``tag``), which lets the exporter overlap communication with the
    assembly of the previous bucket."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return FlatTransfer([], [values if values is not None else torch.empty(0)], None)
    rank = dist.get_rank()
    works = []
    if rank == dst:
        received = []
        for src, size in enumerate(sizes):
            buffer = torch.empty(size if src != dst else 0, dtype=values.dtype)
            if src != dst and size:
                COUNTER["export_recv"] += 1
                works.append(dist.irecv(buffer, src=src, tag=tag))
            received.append(buffer)
        return FlatTransfer(works, received, None)
    if values.numel() != sizes[rank]:
        raise RuntimeError(f"send_flat_to: rank {rank} has {values.numel()} values, planned {sizes[rank]}")
    if values.numel():
        COUNTER["export_send"] += 1
        works.append(dist.isend(values, dst=dst, tag=tag))
    return FlatTransfer(works, None, values)


class StandaloneGroup:
    """A process group of its own between processes that do not share a default group: the
    trainer (rank 0) and inference-engine ranks, for weight broadcasts. It never touches
    ``torch.distributed``'s default group, so Megatron's groups on the trainer are unaffected.

    Its rendezvous is SGLang's, key for key: ``/init_weights_update_group`` runs SGLang's
    ``init_custom_process_group`` (sglang/srt/utils/common.py), which meets at a TCPStore on
    ``tcp://host:port`` hosted by rank 0, wraps it in ``PrefixStore(group_name)`` and hands it to
    torch's ``_new_process_group_helper``; that adds ``"{group_name}/"`` and then one prefix per
    device type, stopping after the first when one backend serves them all: ``"cpu/"`` for gloo,
    ``"cuda/"`` for NCCL. The same prefixes here, without registering the group in torch's global
    tables (a trainer and an in-process engine may both hold one of the same name).

    ``backend`` "nccl" (GPU clusters) or "gloo" (CPU and the local engine). ``timeout_s`` bounds
    each broadcast, and joining too unless ``connect_timeout_s`` is given: then connecting to the
    store and the rendezvous give up after that (torch's TCPStore tries twice, so a dead address is
    given up after about twice it), while broadcasts keep ``timeout_s``."""

    BACKEND_DEVICE = {"gloo": "cpu", "nccl": "cuda"}

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str = "nccl",
                 group_name: str = "weight_sync", timeout_s: float = 600.0, connect_timeout_s: float | None = None):
        import datetime

        if backend not in self.BACKEND_DEVICE:
            raise ValueError(f"weight-sync backend must be 'nccl' or 'gloo', got {backend!r}")
        timeout = datetime.timedelta(seconds=timeout_s)
        join = timeout if connect_timeout_s is None else datetime.timedelta(seconds=connect_timeout_s)
        # per-broadcast timeout; None: the group's own (``timeout``)
        self._op_timeout = None if connect_timeout_s is None else timeout
        store = dist.TCPStore(host, int(port), world_size, rank == 0, timeout=join, multi_tenant=True)
        for prefix in (group_name, f"{group_name}/", f"{self.BACKEND_DEVICE[backend]}/"):
            store = dist.PrefixStore(prefix, store)
        if backend == "gloo":
            self.group = dist.ProcessGroupGloo(store, rank, world_size, join)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options.is_high_priority_stream = False
            options._timeout = timeout  # NCCL connects at its first collective: nothing to bound here
            self.group = dist.ProcessGroupNCCL(store, rank, world_size, options)
        self.rank, self.world_size, self.backend, self.name = rank, world_size, backend, group_name

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        options = dist.BroadcastOptions()
        options.rootRank = src
        if self._op_timeout is not None:
            options.timeout = self._op_timeout
        COUNTER["weight_sync_broadcast"] += 1
        self.group.broadcast([tensor], options).wait()
        return tensor
