"""Per-token log-probs (and entropy) of target tokens from vocab-parallel (TP-sharded) logits.

The full vocabulary is never gathered. Each TP rank reduces its own vocabulary shard, in token
chunks and in fp32, to three numbers per token: the shard's log-sum-exp lse_r, the entropy H_r of
the shard's own softmax, and the target's logit if the shard owns it. One all-gather of those
[n_tok, 3] numbers per micro-batch then gives, with w_r = exp(lse_r - log Z),

    log Z      = logsumexp_r lse_r
    log p(y)   = target_logit - log Z
    entropy    = sum_r w_r (H_r - log w_r)

Logits are divided by the sampling temperature first (SGLang's log-probs are
log_softmax(logits / T)). The backward needs no communication: d log p(y) / d z_v is
(1[v = y] - softmax(z)_v) / T on the rank that owns v. With ``entropy_grad`` (an entropy bonus in
the loss) the entropy has a gradient too, d H / d z_v = -p_v (log p_v + H) / T, also local.

On NVIDIA GPUs the per-shard reduction and the gradient are fused Triton kernels
(``logprobs_kernels``): one read of the logits in the forward, one read and one write in the
backward. ``KERNEL`` (or the environment variable MEGATRON_VESPO_LOGPROB_KERNEL) picks the path:
"auto" (Triton for bf16/fp16/fp32 CUDA logits when Triton imports, else torch), "triton" (also
for CPU tensors under TRITON_INTERPRET=1, as the tests do) or "torch" (the chunked pure-torch
path below). fp64 logits and logits whose vocab dim is not contiguous always take the torch path.
"""

from __future__ import annotations

import os
import warnings

import torch

from megatron_vespo import comm

CHUNK_BYTES = 64 * 2**20
TP_TAG = "hook_logprobs_tp_all_gather"

KERNEL_ENV = "MEGATRON_VESPO_LOGPROB_KERNEL"
KERNEL = os.environ.get(KERNEL_ENV, "auto")
_KERNEL_CHOICES = ("auto", "triton", "torch")
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_kernels = None  # the logprobs_kernels module once imported, False when Triton is unusable
_kernels_error: Exception | None = None


def _load_kernels(required: bool):
    """Import the Triton kernels once; None when Triton is unusable and not ``required``."""
    global _kernels, _kernels_error
    if _kernels is None:
        try:
            from megatron_vespo import logprobs_kernels
            _kernels = logprobs_kernels
        except Exception as exc:  # not installed, or installed without a working backend
            _kernels = False
            _kernels_error = exc
            if not required:
                warnings.warn(f"Triton is unusable ({exc!r}): the log-prob path falls back to torch "
                              f"(slower on GPUs)", RuntimeWarning, stacklevel=3)
    if _kernels is False and required:
        raise RuntimeError(f"{KERNEL_ENV}/logprobs.KERNEL is 'triton' but the Triton kernels do not "
                           f"import: {_kernels_error!r}")
    return _kernels or None


def _use_kernels(logits: torch.Tensor):
    """The kernels module when this call takes the Triton path, else None."""
    if KERNEL not in _KERNEL_CHOICES:
        raise ValueError(f"logprobs.KERNEL ({KERNEL_ENV}) must be one of {_KERNEL_CHOICES}, got {KERNEL!r}")
    if KERNEL == "torch" or logits.dtype not in _KERNEL_DTYPES or logits.stride(-1) != 1:
        return None
    if KERNEL == "auto":
        if not (logits.is_cuda and torch.version.cuda is not None):  # NVIDIA only (untested on ROCm)
            return None
        return _load_kernels(required=False)
    if not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{KERNEL_ENV}/logprobs.KERNEL is 'triton' but the logits are on {logits.device}: "
                           "Triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU ones")
    return _load_kernels(required=True)


_WORKSPACE: dict = {}


def _workspace(name: str, rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A reused chunk buffer. On CPU a fresh large allocation costs more (page faults) than the
    arithmetic done in it; ``release_workspace()`` frees the cache."""
    key = (name, dtype, str(device))
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < rows * cols:
        buf = torch.empty(rows * cols, dtype=dtype, device=device)
        _WORKSPACE[key] = buf
    return buf[: rows * cols].view(rows, cols)


def release_workspace() -> None:
    _WORKSPACE.clear()


def _load_rows(logits, row, count, acc, temperature):
    """fp32 (or wider) copy of ``logits[row:row + count] / temperature`` in the workspace."""
    z = _workspace("z", count, logits.shape[-1], acc, logits.device)
    z.copy_(logits[row:row + count])  # converts bf16 -> fp32 on the way
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _spans(rows: torch.Tensor, chunk_tokens: int):
    """(first index into rows, row start, length) of runs of consecutive rows, cut to chunks."""
    if rows.numel() == 0:
        return []
    breaks = (rows[1:] != rows[:-1] + 1).nonzero().squeeze(1) + 1
    starts = [0] + breaks.tolist()
    ends = starts[1:] + [rows.numel()]
    first_rows = rows[starts].tolist()
    out = []
    for i0, i1, r0 in zip(starts, ends, first_rows):
        for offset in range(0, i1 - i0, chunk_tokens):
            out.append((i0 + offset, r0 + offset, min(chunk_tokens, i1 - i0 - offset)))
    return out


class _VocabParallelLogProbs(torch.autograd.Function):
    """Triton (see ``_use_kernels``): the forward reads each selected row once in a fused kernel and
    the backward recomputes the softmax from the logits in a second one, writing the gradient
    (into the logits' own memory with ``inplace_grad``). Otherwise two torch paths with the same
    arithmetic:

    * in place (``inplace_grad`` and fp32 logits, as in training): each chunk is a view of the
      logits; the forward leaves exp(z - max) there and the backward turns it into the gradient
      (Megatron's vocab-parallel cross-entropy does the same) -- no copies, no recompute;
    * copy (otherwise, e.g. bf16 logits): each chunk is copied to an fp32 workspace and the
      softmax is recomputed in the backward.

    Chunks are runs of consecutive rows (response tokens are contiguous), so they are slices.
    """

    @staticmethod
    def forward(ctx, logits, rows, targets, vocab_start, temperature, group, chunk_tokens, inplace_grad,
                entropy_grad):
        vocab_local = logits.shape[-1]
        local_targets = targets - vocab_start
        owned = (local_targets >= 0) & (local_targets < vocab_local)
        kernels = _use_kernels(logits)
        if kernels is not None:
            # One read of the selected rows; the backward recomputes the softmax from the logits.
            local = kernels.row_stats(logits, rows, local_targets, temperature)
            in_place, spans, shift = False, None, None
        else:
            local, shift, spans, in_place = _torch_forward(logits, rows, local_targets, owned, temperature,
                                                           chunk_tokens, inplace_grad)
        logp, entropy, log_z = _combine_shards(local, group)
        # In place, the logits' version counter moved: any other reader that saved them fails loudly.
        ctx.save_for_backward(logits, rows, local_targets, owned, log_z, shift, entropy if entropy_grad else None)
        ctx.temperature, ctx.spans, ctx.inplace_grad, ctx.in_place = temperature, spans, inplace_grad, in_place
        ctx.kernels, ctx.chunk_tokens, ctx.entropy_grad = kernels, chunk_tokens, entropy_grad
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, rows, local_targets, owned, log_z, shift, entropy = ctx.saved_tensors
        if not ctx.entropy_grad:
            grad_entropy = None
        if grad_entropy is not None and ctx.kernels is not None:
            # the fused kernel has no entropy term: recompute the softmax from the (untouched) logits
            ctx.spans, ctx.in_place = _spans(rows, ctx.chunk_tokens), False
        elif ctx.kernels is not None:
            # The logits are dead after this backward when inplace_grad: the gradient reuses their memory.
            out = logits if ctx.inplace_grad else None
            grad_logits = ctx.kernels.logit_grad(logits, rows, local_targets, log_z, grad_logp, ctx.temperature,
                                                 out=out)
            if ctx.inplace_grad:
                # written behind autograd's back: move the version counter as the torch path does
                torch.autograd.graph.increment_version(logits)
            return grad_logits, None, None, None, None, None, None, None, None
        return _torch_backward(ctx, grad_logp, logits, rows, local_targets, owned, log_z, shift, grad_entropy,
                               entropy)


def _combine_shards(local: torch.Tensor, group):
    """(log p, entropy, log Z) per row from every TP rank's [n, 3] shard statistics: one all-gather."""
    gathered = comm.all_gather_stack(local, group, tag=TP_TAG)  # [tp, n, 3]
    lse_r, neg_entropy_r, target_r = gathered.unbind(-1)
    log_z = torch.logsumexp(lse_r, dim=0)
    # H = -sum_r w_r (sum_v p_r,v log p_r,v + log w_r), w_r = exp(lse_r - log Z): no cancellation
    log_w_r = lse_r - log_z
    entropy = -(log_w_r.exp() * (neg_entropy_r + log_w_r)).sum(0)
    return target_r.sum(0) - log_z, entropy, log_z


def _torch_forward(logits, rows, local_targets, owned, temperature, chunk_tokens, inplace_grad):
    """The chunked pure-torch forward: [n, 3] shard statistics, the per-row shift, the spans and
    whether the softmax was left in the logits' memory."""
    vocab_local = logits.shape[-1]
    n = rows.numel()
    acc = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
    in_place = inplace_grad and logits.dtype == acc and logits.is_contiguous()
    local = torch.empty((n, 3), dtype=acc, device=logits.device)
    shift = torch.empty(n, dtype=acc, device=logits.device)
    safe_targets = local_targets.clamp(0, vocab_local - 1).unsqueeze(1)
    spans = _spans(rows, chunk_tokens)
    for i, row, count in spans:
        if in_place:
            z = logits[row:row + count]
            if temperature != 1.0:
                z.div_(temperature)
        else:
            z = _load_rows(logits, row, count, acc, temperature)
        m = z.amax(dim=-1)
        target_logit = z.gather(1, safe_targets[i:i + count]).squeeze(1)
        z.sub_(m.unsqueeze(1))
        e = _workspace("exp", count, vocab_local, acc, logits.device)
        torch.exp(z, out=e)
        sum_exp = e.sum(-1)
        log_sum = sum_exp.log()
        shift[i:i + count] = m
        local[i:i + count, 0] = m + log_sum  # the shard's log-sum-exp
        # sum_v p_v log p_v of the shard's own softmax (minus its entropy)
        local[i:i + count, 1] = torch.linalg.vecdot(e, z) / sum_exp - log_sum
        local[i:i + count, 2] = torch.where(owned[i:i + count], target_logit, torch.zeros_like(target_logit))
        if in_place:
            z.copy_(e)  # exp(z - m), turned into the gradient by the backward
    return local, shift, spans, in_place


def _torch_backward(ctx, grad_logp, logits, rows, local_targets, owned, log_z, shift, grad_entropy=None,
                    entropy=None):
    """The chunked pure-torch backward (rows not asked for get zeros); ``grad_entropy`` adds the
    entropy's gradient -p (log p + H) (``entropy`` the rows' H)."""
    if ctx.inplace_grad:
        # The logits are dead after this backward: reuse their memory for the gradient.
        unused = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        unused[rows] = False
        logits[unused] = 0
        grad_logits = logits
    else:
        grad_logits = torch.zeros_like(logits)
    for i, row, count in ctx.spans:
        g = grad_logp[i:i + count].to(log_z.dtype)
        if grad_entropy is not None:
            if ctx.in_place:
                z = logits[row:row + count]
                z.mul_(torch.exp(shift[i:i + count] - log_z[i:i + count]).unsqueeze(1))  # softmax
            else:
                z = _load_rows(logits, row, count, log_z.dtype, ctx.temperature)
                z.sub_(log_z[i:i + count].unsqueeze(1)).exp_()
            # -g_H p (log p + H); xlogy keeps p log p at 0 where p underflows to 0
            term = torch.special.xlogy(z, z)
            term.addcmul_(z, entropy[i:i + count].to(z.dtype).unsqueeze(1))
            term.mul_(-grad_entropy[i:i + count].to(z.dtype).unsqueeze(1))
            z.mul_(-g.unsqueeze(1)).add_(term)
        elif ctx.in_place:  # the rows hold exp(z - m): softmax = that * exp(m - log Z)
            z = logits[row:row + count]
            z.mul_((-g * torch.exp(shift[i:i + count] - log_z[i:i + count])).unsqueeze(1))
        else:
            z = _load_rows(logits, row, count, log_z.dtype, ctx.temperature)
            z.sub_(log_z[i:i + count].unsqueeze(1)).exp_().mul_(-g.unsqueeze(1))  # -g * softmax
        mine = owned[i:i + count].nonzero().squeeze(1)
        z[mine, local_targets[i:i + count][mine]] += g[mine]
        if ctx.temperature != 1.0:
            z.div_(ctx.temperature)
        if not ctx.in_place:
            grad_logits[row:row + count] = z  # converts to the logits' dtype
    return grad_logits, None, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int = 0,
    temperature: float = 1.0,
    group=None,
    chunk_tokens: int | None = None,
    inplace_grad: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(targets) and entropy at ``rows`` of ``logits`` [n_positions, vocab_local].

    ``targets`` holds global vocabulary ids; this rank's shard covers
    [vocab_start, vocab_start + vocab_local). Returns fp32, or fp64 for fp64 logits
    (logp with grad; the entropy too with ``entropy_grad``, else detached).

    ``chunk_tokens`` defaults to about CHUNK_BYTES of fp32 logits per chunk. ``inplace_grad``
    writes the gradient into ``logits``' own memory (as Megatron's vocab-parallel cross-entropy
    does): only for logits that nothing else reads after this backward.
    """
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_BYTES // (4 * max(1, logits.shape[-1])))
    if logits.dim() != 2:
        raise ValueError(f"logits must be [positions, vocab_shard], got shape {tuple(logits.shape)}")
    if rows.shape != targets.shape or rows.dim() != 1:
        raise ValueError(
            f"rows {tuple(rows.shape)} and targets {tuple(targets.shape)} must be equal 1-D shapes"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _VocabParallelLogProbs.apply(
        logits, rows.long(), targets.long(), int(vocab_start), float(temperature), group,
        int(chunk_tokens), bool(inplace_grad), bool(entropy_grad),
    )


@torch.no_grad()
def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int = 0,
    temperature: float = 1.0,
    group=None,
    chunk_tokens: int | None = None,
    scale_logits=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only: log p(targets) and entropy of the rows of ``hidden`` [n, h] through this
    rank's shard of the output layer, ``weight`` [vocab_local, h] (logits = hidden @ weight.T,
    then ``scale_logits``). The logits are formed ``chunk_tokens`` rows at a time and reduced to
    the same [n, 3] shard statistics as :func:`vocab_parallel_logprobs`: at most one chunk of
    logits exists at once, and rows not asked for are never multiplied. Same dtypes as there."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [n, h] and weight [vocab_shard, h] must agree, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be one per row of hidden {tuple(hidden.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab_local, n = weight.shape[0], hidden.shape[0]
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_BYTES // (4 * max(1, vocab_local)))
    acc = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    local = torch.empty((n, 3), dtype=acc, device=hidden.device)
    local_targets = targets.long() - int(vocab_start)
    owned = (local_targets >= 0) & (local_targets < vocab_local)
    for start in range(0, n, chunk_tokens):
        count = min(chunk_tokens, n - start)
        logits = hidden[start:start + count] @ weight.t()
        if scale_logits is not None:
            logits = scale_logits(logits)
        rows = torch.arange(count, device=hidden.device)
        kernels = _use_kernels(logits)
        if kernels is not None:
            local[start:start + count] = kernels.row_stats(logits, rows, local_targets[start:start + count],
                                                           float(temperature))
        else:  # the chunk is ours: the fp32 torch path may work in it in place
            stats, *_ = _torch_forward(logits, rows, local_targets[start:start + count],
                                       owned[start:start + count], float(temperature), count, inplace_grad=True)
            local[start:start + count] = stats
    logp, entropy, _ = _combine_shards(local, group)
    return logp, entropy
