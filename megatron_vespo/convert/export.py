"""Megatron-Core (any layout) -> Hugging Face-named tensors, streamed in buckets of bounded bytes.

``export_hf`` is the single source for checkpoint export and for weight sync to inference engines.
Every rank must iterate it to the end (each bucket is one collective); the destination rank gets
the full tensors, the others empty buckets.

How pieces are located: the load mapping (:func:`weights.local_tensor`) is run on a probe source
whose entries are their own coordinates (tensor id << 40 | flat index), so each parameter element
knows which HF tensor element it is. No inverse mapping is written by hand, so loading and export
cannot drift apart. The destination checks that every element of every tensor arrived.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Iterator

import torch

from megatron_vespo import comm
from megatron_vespo.mcore.model import MoEModelConfig
from megatron_vespo.mcore.weights import ShardContext, TensorSource, hf_shapes, local_tensor

ID_SHIFT = 40


class _CoordinateSource(TensorSource):
    """Each HF tensor reads as its own coordinates; slices are built without the whole tensor."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], ids: dict[str, int], device="meta"):
        self.shapes, self.ids, self.device = shapes, ids, device
        self.names_read: set[str] = set()

    def shape(self, name):
        if name not in self.shapes:
            raise KeyError(f"missing tensor {name!r}")
        return self.shapes[name]

    def read(self, name, dim=None, start=0, stop=None):
        shape = self.shape(name)
        self.names_read.add(name)
        if self.device == "meta":
            sizes = list(shape)
            if dim is not None:
                sizes[dim] = (stop if stop is not None else shape[dim]) - start
            return torch.empty(sizes, dtype=torch.int64, device="meta")
        strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]
        index = torch.full((1,) * len(shape), self.ids[name] << ID_SHIFT, dtype=torch.int64)
        for k, size in enumerate(shape):
            lo, hi = (start, stop if stop is not None else size) if k == dim else (0, size)
            view = [1] * len(shape)
            view[k] = hi - lo
            index = index + (torch.arange(lo, hi, dtype=torch.int64) * strides[k]).view(view)
        return index


def _owns(param, ps) -> bool:
    """Send each element once: one data-parallel replica, one TP rank for TP-replicated params."""
    expert = not getattr(param, "allreduce", True)
    if expert:
        if ps.get_expert_data_parallel_rank() != 0:
            return False
    elif ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        return False
    if not getattr(param, "tensor_model_parallel", False):
        tp_rank = ps.get_expert_tensor_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
        return tp_rank == 0
    return True


def plan_buckets(m: MoEModelConfig, dtype: torch.dtype, bucket_bytes: int) -> list[list[str]]:
    """HF names grouped in order into buckets of at most ``bucket_bytes`` (one tensor may exceed it)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    size = torch.empty((), dtype=dtype).element_size()
    buckets, current, used = [], [], 0
    for name, shape in hf_shapes(m).items():
        nbytes = math.prod(shape) * size
        if current and used + nbytes > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        buckets.append(current)
    return buckets


def _runs(coords: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Compress a parameter's flat coordinates into (hf_id, hf_offset, param_offset, length) runs."""
    flat = coords.reshape(-1)
    if flat.numel() == 0:
        return []
    breaks = (flat[1:] != flat[:-1] + 1).nonzero().squeeze(1) + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), breaks])
    lengths = torch.diff(torch.cat([starts, torch.tensor([flat.numel()])]))
    first = flat[starts]
    mask = (1 << ID_SHIFT) - 1
    return list(zip((first >> ID_SHIFT).tolist(), (first & mask).tolist(), starts.tolist(), lengths.tolist()))


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _param_runs(chunks, m, shapes, ids, ps):
    """For each parameter this rank sends: its runs, computed once per model (weight sync exports
    the same model again and again) from probed coordinates."""
    plans = _PLANS.get(chunks[0])
    if plans is not None and plans["model"] == (m, len(chunks)):
        return plans["runs"]
    runs = []
    for chunk in chunks:
        ctx = ShardContext.from_model(chunk, m)
        for name, param in chunk.named_parameters():
            if name == "output_layer.weight" and m.tie_word_embeddings:
                continue  # the last stage's copy of the tied embedding (PP > 1): sent from the first
            if _owns(param, ps):
                coords = local_tensor(name, _CoordinateSource(shapes, ids, device="cpu"), ctx)
                runs.append((param, _runs(coords)))
    _PLANS[chunks[0]] = {"model": (m, len(chunks)), "runs": runs}  # bucket plans join it later
    return runs


def _blocks(pieces):
    """Merge runs [(source, source offset, hf_id, hf_offset, length)] into strided blocks
    (source, source offset, hf_id, hf_offset, hf_stride, length, count): ``count`` runs of equal
    ``length``, consecutive in the source and ``hf_stride`` apart in the HF tensor. A tensor-parallel
    slice of a [rows, cols] weight is one block instead of ``rows`` runs, so moving a bucket costs a
    few copies, not one per row."""
    blocks = []
    for source, offset, hf_id, hf_offset, length in pieces:
        if blocks:
            b_source, b_offset, b_id, b_hf, b_stride, b_length, b_count = blocks[-1]
            if (b_source == source and b_id == hf_id and b_length == length
                    and offset == b_offset + length * b_count):
                stride = hf_offset - b_hf if b_count == 1 else b_stride
                if stride >= length and hf_offset == b_hf + stride * b_count:
                    blocks[-1] = (b_source, b_offset, b_id, b_hf, stride, length, b_count + 1)
                    continue
        blocks.append((source, offset, hf_id, hf_offset, length, length, 1))
    return blocks


def _bucket_plan(param_runs, buckets, ids, dst):
    """Per bucket, this rank's blocks (see :func:`_blocks`, source = parameter index). The
    destination also gets every other rank's blocks, with offsets into the flat tensor that rank
    sends; exchanged once per model, so buckets then carry only tensor bytes."""
    bucket_of = {ids[name]: b for b, bucket in enumerate(buckets) for name in bucket}
    pieces = [[] for _ in buckets]
    for index, (_, runs) in enumerate(param_runs):
        for hf_id, hf_offset, start, length in runs:
            pieces[bucket_of[hf_id]].append((index, start, hf_id, hf_offset, length))
    mine = [_blocks(bucket_pieces) for bucket_pieces in pieces]
    layouts = []
    for blocks in mine:
        offset, layout = 0, []
        for _, _, hf_id, hf_offset, stride, length, count in blocks:
            layout.append((0, offset, hf_id, hf_offset, stride, length, count))
            offset += length * count
        layouts.append(layout)
    everyone = comm.gather_objects(layouts, dst=dst)
    return mine, everyone


def export_hf(gpt_model, m: MoEModelConfig, bucket_bytes: int = 512 * 2**20, dst: int = 0,
              dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of (hf_name, full tensor) on global rank ``dst``; [] elsewhere. Collective.
    ``gpt_model`` is this rank's model chunk, or the list of its chunks (virtual pipeline).

    The destination copies its own parameters' blocks straight into the output tensors; every other
    rank sends one flat tensor per bucket, point to point (``comm.send_flat_to``), and the next
    bucket is already in flight while the destination assembles the current one. Who sends which
    blocks is exchanged once per model. The destination checks that every element of every tensor
    arrived exactly once."""
    from megatron.core import parallel_state as ps

    chunks = list(gpt_model) if isinstance(gpt_model, (list, tuple)) else [gpt_model]
    shapes = hf_shapes(m)
    ids = {name: i for i, name in enumerate(shapes)}
    if dtype is None:
        dtype = next(p.dtype for _, p in chunks[0].named_parameters())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    param_runs = _param_runs(chunks, m, shapes, ids, ps)
    buckets = plan_buckets(m, dtype, bucket_bytes)
    key = ("buckets", bucket_bytes, dtype, dst)
    plans = _PLANS[chunks[0]]
    if key not in plans:
        plans[key] = _bucket_plan(param_runs, buckets, ids, dst)
    mine, everyone = plans[key]
    flats = [param.detach().reshape(-1) for param, _ in param_runs]

    def start(b):
        if b >= len(buckets):
            return None
        if rank == dst:
            sizes = [sum(length * count for *_, length, count in layout[b]) for layout in everyone]
            return comm.send_flat_to(torch.empty(0, dtype=dtype), sizes, dst=dst, tag=b)
        blocks = mine[b]
        # blocks are consecutive in their parameter: one slice each
        values = torch.cat([flats[i][s:s + n * c] for i, s, *_, n, c in blocks]).to("cpu", dtype) \
            if blocks else torch.empty(0, dtype=dtype)
        sizes = [0] * (rank + 1)
        sizes[rank] = values.numel()
        return comm.send_flat_to(values, sizes, dst=dst, tag=b)

    in_flight = start(0)
    for b, bucket in enumerate(buckets):
        current, in_flight = in_flight, start(b + 1)
        received = current.wait()
        if rank != dst:
            yield []
            continue
        sources = [(flats, mine[b])] + [([values], layout[b]) for values, layout in zip(received, everyone)
                                        if values.numel()]
        yield _assemble(bucket, shapes, ids, sources, dtype)


def _assemble(bucket, shapes, ids, sources, dtype):
    """``sources``: [(flat tensors, blocks indexing them)]; one strided copy per block."""
    full = {ids[n]: torch.empty(math.prod(shapes[n]), dtype=dtype) for n in bucket}
    covered = {hf_id: 0 for hf_id in full}
    for tensors, blocks in sources:
        for source, offset, hf_id, hf_offset, stride, length, count in blocks:
            target = full[hf_id].as_strided((count, length), (stride, 1), hf_offset)
            target.copy_(tensors[source][offset:offset + length * count].view(count, length))
            covered[hf_id] += length * count
    out = []
    for name in bucket:
        expected = math.prod(shapes[name])
        # every element is sent by exactly one rank, so counts add up exactly
        if covered[ids[name]] != expected:
            raise RuntimeError(f"export: {name} received {covered[ids[name]]} of {expected} elements")
        out.append((name, full[ids[name]].view(shapes[name])))
    return out


def save_hf_checkpoint(gpt_model, m: MoEModelConfig, out_dir: str, hf_config: dict,
                       bucket_bytes: int = 2 * 2**30, dtype: torch.dtype | None = None,
                       progress=None) -> list[str]:
    """Write HF safetensors shards (one per bucket), the index and config.json on global rank 0."""
    from safetensors.torch import save_file

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if dtype is None:
        first = gpt_model[0] if isinstance(gpt_model, (list, tuple)) else gpt_model
        dtype = next(p.dtype for _, p in first.named_parameters())
    n_buckets = len(plan_buckets(m, dtype, bucket_bytes))
    files, weight_map = [], {}
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    for i, bucket in enumerate(export_hf(gpt_model, m, bucket_bytes, dst=0, dtype=dtype)):
        if progress is not None:
            progress(i + 1, n_buckets)
        if rank != 0:
            continue
        file = f"model-{i + 1:05d}-of-{n_buckets:05d}.safetensors"
        save_file({name: t.contiguous() for name, t in bucket}, os.path.join(out_dir, file),
                  metadata={"format": "pt"})
        weight_map.update({name: file for name, _ in bucket})
        files.append(file)
    if rank == 0:
        total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=1)
    return files
