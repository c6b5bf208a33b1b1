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
    cached = _PLANS.get(chunks[0])
    if cached is not None and cached[0] == (m, len(chunks)):
        return cached[1]
    runs = []
    for chunk in chunks:
        ctx = ShardContext.from_model(chunk, m)
        for name, param in chunk.named_parameters():
            if name == "output_layer.weight" and m.tie_word_embeddings:
                continue  # the last stage's copy of the tied embedding (PP > 1): sent from the first
            if _owns(param, ps):
                coords = local_tensor(name, _CoordinateSource(shapes, ids, device="cpu"), ctx)
                runs.append((param, _runs(coords)))
    _PLANS[chunks[0]] = ((m, len(chunks)), runs)
    return runs


def export_hf(gpt_model, m: MoEModelConfig, bucket_bytes: int = 512 * 2**20, dst: int = 0,
              dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of (hf_name, full tensor) on global rank ``dst``; [] elsewhere. Collective.
    ``gpt_model`` is this rank's model chunk, or the list of its chunks (virtual pipeline).

    The destination copies its own parameters' runs straight into the output tensors; other
    ranks send one flat tensor per bucket (``comm.gather_flat``) plus their runs. The
    destination checks that every element of every tensor arrived exactly once."""
    from megatron.core import parallel_state as ps

    chunks = list(gpt_model) if isinstance(gpt_model, (list, tuple)) else [gpt_model]
    shapes = hf_shapes(m)
    ids = {name: i for i, name in enumerate(shapes)}
    if dtype is None:
        dtype = next(p.dtype for _, p in chunks[0].named_parameters())
    param_runs = _param_runs(chunks, m, shapes, ids, ps)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for bucket in plan_buckets(m, dtype, bucket_bytes):
        wanted = {ids[n] for n in bucket}
        local = []  # (flat parameter, start, hf_id, hf_offset, length)
        for param, runs in param_runs:
            flat = param.detach().reshape(-1)
            local += [(flat, start, hf_id, hf_offset, length)
                      for hf_id, hf_offset, start, length in runs if hf_id in wanted]
        if rank == dst:
            values, meta = torch.empty(0, dtype=dtype), []
        else:
            values = torch.cat([f[s:s + n] for f, s, _, _, n in local]).to("cpu", dtype) if local \
                else torch.empty(0, dtype=dtype)
            offsets = torch.tensor([0] + [n for *_, n in local]).cumsum(0).tolist()
            meta = [(hf_id, hf_offset, offsets[i], n) for i, (_, _, hf_id, hf_offset, n) in enumerate(local)]
        gathered = comm.gather_flat(values, meta, dst=dst)
        if rank != dst:
            yield []
            continue
        yield _assemble(bucket, shapes, ids, local, gathered, dtype)


def _assemble(bucket, shapes, ids, local, gathered, dtype):
    full = {ids[n]: torch.empty(math.prod(shapes[n]), dtype=dtype) for n in bucket}
    covered = {hf_id: 0 for hf_id in full}
    for flat, start, hf_id, hf_offset, length in local:
        full[hf_id][hf_offset:hf_offset + length] = flat[start:start + length]
        covered[hf_id] += length
    for values, meta in gathered:
        for hf_id, hf_offset, offset, length in meta:
            full[hf_id][hf_offset:hf_offset + length] = values[offset:offset + length]
            covered[hf_id] += length
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
