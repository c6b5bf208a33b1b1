"""Fused Triton kernels for ``megatron_vespo.logprobs`` (NVIDIA GPUs; CPU tensors under TRITON_INTERPRET=1).

The kernels read the logits [positions, vocab_shard] (bf16/fp16/fp32, any row stride, vocab
contiguous), divide them by the temperature and compute in fp32:

* ``row_stats`` (forward, one read of the selected rows): one program per (selected row, chunk of
  FWD_BLOCK columns) writes the chunk's max m_c, s_c = sum exp(z - m_c) and
  t_c = sum exp(z - m_c) (z - m_c); a second, tiny kernel (one program per row) merges the
  chunks and reads the target's logit. Result [n, 3]: the shard's log-sum-exp, sum_v p_v log p_v
  of the shard's own softmax (minus its entropy) and the target's logit (0 where the shard does
  not own the target) -- the numbers the pure-torch path in logprobs.py produces per chunk. Each
  program handles one block without a loop, so the read is spread over many small programs, as
  in the backward.
* ``logit_grad`` (backward, one read and one write): one program per (position, BWD_BLOCK
  columns) writes (1[v = y] - exp(z_v - log Z)) * g / T in the output's dtype; positions that are
  not selected get zeros (as in the torch path). The output may be the logits tensor itself.

Only basic ``triton.language`` (load/store with masks, max/sum, exp/log, where) is used, so the
kernels build with Triton 3.x.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Forward: one program per (selected row, FWD_BLOCK columns); measured best on an H200 (4096 / 4:
# 0.685 ms for 8192 x 151936 bf16; 8192 / 8: 0.692; 2048 / 4: 0.748; docs/PERFORMANCE.md).
FWD_BLOCK = 4096
FWD_WARPS = 4
LN2 = tl.constexpr(0.6931471805599453)
LOG2E = 1.4426950408889634
# Backward: one program per (position, BWD_BLOCK columns).
BWD_BLOCK = 8192
BWD_WARPS = 8

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _chunk_stats_kernel(x_ptr, stride_x, rows_ptr, part_ptr, V, scale2, BLOCK: tl.constexpr):
    # Few operations per element (on an H200 this pass is bound by them, not by memory): base-2
    # units, zc = z / T * log2(e) in one multiply, exp2 of the difference, and a clamp instead of
    # a select to keep exp2(-inf) * -inf = NaN out of the entropy sum (NaN logits still give NaN).
    i = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row = tl.load(rows_ptr + i).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    zc = tl.load(x_ptr + row * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * scale2
    m = tl.max(zc, axis=0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)  # a chunk of -inf logits: s = 0, t = 0
    d = tl.maximum(zc - m_shift, -16384.0, propagate_nan=tl.PropagateNan.ALL)  # exp2(-16384) = 0
    e = tl.exp2(d)
    part = part_ptr + (i * tl.num_programs(1) + chunk) * 3
    tl.store(part, m * LN2)  # back to natural units for the merge
    tl.store(part + 1, tl.sum(e, axis=0))
    tl.store(part + 2, tl.sum(e * d, axis=0) * LN2)


@triton.jit
def _merge_chunks_kernel(part_ptr, x_ptr, stride_x, rows_ptr, tgt_ptr, out_ptr, V, inv_t, n_chunks,
                         CHUNKS: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS)
    part = part_ptr + (i * n_chunks + c) * 3
    m_c = tl.load(part, mask=c < n_chunks, other=float("-inf"))
    s_c = tl.load(part + 1, mask=c < n_chunks, other=0.0)
    t_c = tl.load(part + 2, mask=c < n_chunks, other=0.0)
    m = tl.max(m_c, axis=0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    # s_c >= 1 for a chunk with a finite logit; padding lanes and all -inf chunks hold s_c = t_c = 0
    # and are left out (NaN chunks stay in, so NaN logits give a NaN log-sum-exp)
    delta = tl.where(s_c != 0.0, m_c - m_shift, 0.0)  # <= 0
    w = tl.exp(delta)
    s = tl.sum(w * s_c, axis=0)
    # sum_v e^(z_v - m) (z_v - m) = sum_c w_c (t_c + (m_c - m) s_c)
    t = tl.sum(w * (t_c + delta * s_c), axis=0)
    log_s = tl.log(s)
    row = tl.load(rows_ptr + i).to(tl.int64)
    tgt = tl.load(tgt_ptr + i).to(tl.int64)  # local target id; may lie outside [0, V)
    owned = (tgt >= 0) & (tgt < V)
    target = tl.load(x_ptr + row * stride_x + tgt, mask=owned, other=0.0).to(tl.float32) * inv_t
    out = out_ptr + i * 3
    tl.store(out, m_shift + log_s)
    tl.store(out + 1, t / s - log_s)
    tl.store(out + 2, tl.where(owned, target, 0.0))


@triton.jit
def _logit_grad_kernel(x_ptr, stride_x, out_ptr, stride_out, sel_ptr, tgt_ptr, lse_ptr, g_ptr, V, inv_t,
                       BLOCK: tl.constexpr):
    pos = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    idx = tl.load(sel_ptr + pos)  # index into the selected rows, -1 where not selected
    selected = idx >= 0
    i = tl.maximum(idx, 0).to(tl.int64)
    lse = tl.load(lse_ptr + i, mask=selected, other=0.0)
    g = tl.load(g_ptr + i, mask=selected, other=0.0) * inv_t
    tgt = tl.load(tgt_ptr + i, mask=selected, other=-1).to(tl.int64)
    in_row = offs < V
    # Nothing is read on rows that are not selected: there z = 0, lse = 0, g = 0 and no column is
    # the target, so the gradient is 0 - 1 * 0 = +0.0 exactly (as the torch path writes).
    z = tl.load(x_ptr + pos * stride_x + offs, mask=offs < tl.where(selected, V, 0), other=0.0)
    z = z.to(tl.float32) * inv_t
    p = tl.exp(z - lse)
    grad = tl.where(offs == tgt, g, 0.0) - p * g
    tl.store(out_ptr + pos * stride_out + offs, grad.to(out_ptr.dtype.element_ty), mask=in_row)


def _warps(block: int, most: int) -> int:
    return max(1, min(most, block // 512))


def _device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _check(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with a contiguous vocab dim, got shape {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"logits dtype {logits.dtype} is not one of {SUPPORTED_DTYPES}")


def row_stats(logits: torch.Tensor, rows: torch.Tensor, local_targets: torch.Tensor, temperature: float,
              block: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """fp32 [n, 3] per selected row of ``logits / temperature``: the shard's log-sum-exp,
    sum_v p_v log p_v of the shard's softmax, and the target logit (0 where ``local_targets`` is
    outside [0, vocab_shard)). ``block`` / ``num_warps`` override FWD_BLOCK / FWD_WARPS."""
    _check(logits)
    n, vocab = rows.numel(), logits.shape[1]
    out = torch.empty((n, 3), dtype=torch.float32, device=logits.device)
    if n == 0:
        return out
    rows = rows.contiguous()
    block = block or min(FWD_BLOCK, triton.next_power_of_2(max(vocab, 16)))
    n_chunks = triton.cdiv(vocab, block)
    part = torch.empty((n, n_chunks, 3), dtype=torch.float32, device=logits.device)
    with _device(logits):
        _chunk_stats_kernel[(n, n_chunks)](
            logits, logits.stride(0), rows, part, vocab, LOG2E / temperature,
            BLOCK=block, num_warps=num_warps or _warps(block, FWD_WARPS),
        )
        _merge_chunks_kernel[(n,)](
            part, logits, logits.stride(0), rows, local_targets.contiguous(), out, vocab, 1.0 / temperature,
            n_chunks, CHUNKS=max(16, triton.next_power_of_2(n_chunks)), num_warps=1,
        )
    return out


def logit_grad(logits: torch.Tensor, rows: torch.Tensor, local_targets: torch.Tensor, log_z: torch.Tensor,
               grad_logp: torch.Tensor, temperature: float, out: torch.Tensor | None = None,
               block: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """d (sum_i g_i log p_i) / d logits into ``out`` (default: a new tensor like ``logits``; may be
    ``logits`` itself): (1[v = y_i] - exp(z_v / T - log_z_i)) g_i / T at rows[i], 0 elsewhere.
    ``block`` / ``num_warps`` override BWD_BLOCK / BWD_WARPS."""
    _check(logits)
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _check(out)
    if out.shape != logits.shape:
        raise ValueError(f"out shape {tuple(out.shape)} != logits shape {tuple(logits.shape)}")
    positions, vocab = logits.shape
    if positions == 0 or vocab == 0:
        return out
    n = rows.numel()
    sel = torch.full((positions,), -1, dtype=torch.int64, device=logits.device)
    sel[rows] = torch.arange(n, dtype=torch.int64, device=logits.device)
    block = block or min(BWD_BLOCK, triton.next_power_of_2(max(vocab, 16)))
    with _device(logits):
        _logit_grad_kernel[(positions, triton.cdiv(vocab, block))](
            logits, logits.stride(0), out, out.stride(0), sel, local_targets.contiguous(),
            log_z.float().contiguous(), grad_logp.float().contiguous(), vocab, 1.0 / temperature,
            BLOCK=block, num_warps=num_warps or _warps(block, BWD_WARPS),
        )
    return out
