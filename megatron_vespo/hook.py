"""The policy-loss hook that Megatron-Core's ``get_forward_backward_func()`` calls.

``make_forward_step(loss_cfg)`` returns a ``forward_step_func(data_iterator, model)``; its
``loss_func`` runs on the last pipeline stage and returns, under
``calculate_per_token_loss=True``,

    (local loss sum, local normaliser [int], metrics {name: tensor([sum, count])})

so Megatron's ``finalize_model_grads`` (sum of normalisers over DP x CP x micro-batches x PP,
then grad scaling) makes the result exact in every layout.

Per micro-batch the hook adds, besides Megatron's own traffic:
  * one TP all-gather of [n_tok, 3] numbers (vocab-parallel log-probs and entropy);
  * one CP all-reduce of [n_seq, k] per-sequence sums (log-ratio, mismatch, token count, extras).
Nothing else crosses ranks; phi and every sequence factor are then computed identically on each
CP rank from the reduced sums.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from megatron_vespo import comm, kernel, losses
from megatron_vespo.batch import MicroBatch
from megatron_vespo.logprobs import logprobs_from_hidden, vocab_parallel_logprobs
from megatron_vespo.losses import LossConfig, SequenceStats, TokenBatch

CP_TAG = "hook_sequence_stats_cp_all_reduce"
SP_TAG = "scoring_sequence_parallel_all_gather"  # hidden states, scoring from hidden states only
TOTALS = ("response_tokens", "sequences", "sequences/adv_pos", "sequences/adv_neg")  # sums over the step


@dataclass
class HookGroups:
    tp: object = None
    cp: object = None
    tp_rank: int = 0
    cp_rank: int = 0

    @classmethod
    def from_parallel_state(cls) -> "HookGroups":
        from megatron.core import parallel_state as ps

        return cls(
            tp=ps.get_tensor_model_parallel_group(),
            cp=ps.get_context_parallel_group(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            cp_rank=ps.get_context_parallel_rank(),
        )


def _pair(total: torch.Tensor, count) -> torch.Tensor:
    """[sum, count] in fp64 on the device of ``total``."""
    total = total.detach().to(torch.float64).reshape(())
    return torch.stack([total, torch.as_tensor(count, dtype=torch.float64, device=total.device).reshape(())])


def sequence_statistics(tokens: TokenBatch, advantages: torch.Tensor, n_seq: int, cfg: LossConfig,
                        cp_group) -> SequenceStats:
    """Per-sequence sums formed locally and combined with ONE all-reduce over the CP group."""
    adv_tok = advantages[tokens.seq_index].to(tokens.logp.dtype)
    extras = losses.sequence_sums_for(cfg, tokens, adv_tok)
    columns = [tokens.token_log_ratio().detach(), tokens.token_mismatch(), torch.ones_like(tokens.old_logp)]
    columns += list(extras.values())
    dtype = torch.promote_types(tokens.logp.dtype, torch.float32)
    local = torch.stack([c.to(dtype) * tokens.mask for c in columns], dim=1)
    sums = torch.zeros((n_seq, local.shape[1]), dtype=dtype, device=local.device)
    sums.index_add_(0, tokens.seq_index, local)
    comm.all_reduce_sum(sums, cp_group, tag=CP_TAG)
    return SequenceStats(
        log_ratio_sum=sums[:, 0],
        mismatch_sum=sums[:, 1],
        token_count=sums[:, 2],
        advantages=advantages.to(dtype),
        extra={name: sums[:, 3 + i] for i, name in enumerate(extras)},
    )


def loss_from_logits(
    logits: torch.Tensor,
    mb: MicroBatch,
    cfg: LossConfig,
    groups: HookGroups,
    chunk_tokens: int | None = None,
    check_finite: bool = True,
    inplace_grad: bool = False,
):
    """The loss_func body: logits [b, s, vocab/tp] of this rank's (CP-local) micro-batch.

    ``inplace_grad`` reuses the logits' memory for their gradient; the forward step sets it, as
    Megatron's logits are read by nothing else once the loss is formed."""
    if logits.shape[:2] != mb.labels.shape:
        raise ValueError(
            f"logits have batch/sequence shape {tuple(logits.shape[:2])}, the micro-batch "
            f"{tuple(mb.labels.shape)}"
        )
    vocab_local = logits.shape[-1]
    flat_mask = mb.loss_mask.reshape(-1)
    rows = flat_mask.nonzero().squeeze(1)
    logp, entropy = vocab_parallel_logprobs(
        logits.reshape(-1, vocab_local),
        rows,
        mb.labels.reshape(-1)[rows],
        vocab_start=groups.tp_rank * vocab_local,
        temperature=cfg.temperature,
        group=groups.tp,
        chunk_tokens=chunk_tokens,
        inplace_grad=inplace_grad,
        entropy_grad=cfg.entropy_coef > 0,
    )
    if check_finite and not torch.isfinite(logp.detach()).all():
        bad = ~torch.isfinite(logp.detach())
        raise FloatingPointError(
            f"the model produced non-finite log-probs for {int(bad.sum())} response tokens (first "
            f"local indices {bad.nonzero().flatten()[:5].tolist()}); the logits hold NaN/inf"
        )
    engine = None if mb.engine_logp is None else mb.engine_logp.reshape(-1)[rows]
    old = mb.old_logp.reshape(-1)[rows]
    if cfg.bypass:
        if engine is None:
            raise ValueError("bypass mode needs the engine's per-token log-probs")
        old, engine = engine, None
    seq_index = mb.seq_index.reshape(-1)[rows]
    # a sequence that is not trained (Sample.trained) keeps its rows for the statistics' shapes only
    mask = torch.ones_like(logp) if mb.seq_weight is None else mb.seq_weight.to(logp)[seq_index]
    tokens = TokenBatch(
        logp=logp,
        old_logp=old,
        engine_logp=engine,
        mask=mask,
        seq_index=seq_index,
        ref_logp=None if mb.ref_logp is None else mb.ref_logp.reshape(-1)[rows],
    )
    stats = sequence_statistics(tokens, mb.advantages, mb.n_seq, cfg, groups.cp)
    out, weights, corr_metrics = losses.compute_loss(stats, tokens, cfg)
    owns_sequences = groups.cp_rank == 0
    loss_sum, normaliser = losses.aggregate(
        out.per_token_loss, weights, tokens, stats, cfg.aggregation, owns_sequences
    )
    extra_term, extra_metrics = losses.regularizer(tokens, entropy, cfg)
    if extra_term is not None:  # the same normaliser: it is one loss
        extra_sum, _ = losses.aggregate(extra_term, torch.ones_like(extra_term), tokens, stats, cfg.aggregation,
                                        owns_sequences)
        loss_sum = loss_sum + extra_sum
    corr_metrics = {**corr_metrics, **extra_metrics}
    metrics = _metrics(tokens, stats, out, corr_metrics, entropy.detach(), loss_sum, normaliser, owns_sequences)
    return loss_sum, normaliser.round().to(torch.int), metrics


def _metrics(tokens, stats, out, corr_metrics, entropy, loss_sum, normaliser, owns_sequences):
    """Metric name -> [sum, count] (a mean over the step), or -> [extreme, count] for names ending in
    /max or /min, or -> [sum of squares, count] for names ending in /std (see reduce_metrics)."""
    n_tok = tokens.mask.sum()

    def token_sum(values):  # over the tokens in the loss
        return (values * tokens.mask).sum()

    metrics = {
        "policy_loss": _pair(loss_sum.detach(), normaliser),
        "entropy": _pair(token_sum(entropy), n_tok),
        "kl_k3": _pair(token_sum(losses.per_token_kl_k3(tokens.old_logp, tokens.logp.detach())), n_tok),
        "response_tokens": _pair(n_tok, n_tok),
    }
    if tokens.engine_logp is not None:
        diff = tokens.old_logp - tokens.engine_logp
        metrics["mismatch/abs_logp_diff"] = _pair(token_sum(diff.abs()), n_tok)
        metrics["mismatch/kl_k3"] = _pair(token_sum(losses.per_token_kl_k3(tokens.old_logp, tokens.engine_logp)),
                                          n_tok)
    for name, values in {**out.token_metrics, **corr_metrics}.items():
        metrics[name] = _pair(token_sum(values), n_tok)
    # Sequence metrics are identical on every CP rank: count them on one.
    scale = 1.0 if owns_sequences else 0.0
    n_seq = stats.advantages.numel()
    # the sign split of the paper's reference: A = 0 is neither positive nor negative
    positive, negative = stats.advantages > 0, stats.advantages < 0
    for name, values in out.sequence_metrics.items():
        values = values.detach()
        metrics[name] = _pair(values.sum() * scale, n_seq * scale)
        metrics[f"{name}/max"] = _extreme(values, torch.amax, scale)
        metrics[f"{name}/min"] = _extreme(values, torch.amin, scale)
        if name in ("phi", "w_seq"):
            metrics[f"{name}/adv_pos"] = _pair(values[positive].sum() * scale, positive.sum() * scale)
            metrics[f"{name}/adv_neg"] = _pair(values[negative].sum() * scale, negative.sum() * scale)
    if "w_seq" in out.sequence_metrics:
        w_seq = out.sequence_metrics["w_seq"].detach()
        metrics["w_seq/std"] = _pair(w_seq.double().pow(2).sum() * scale, n_seq * scale)
        metrics["w_seq/adv_neg_over_100"] = _pair(((w_seq > 100) & negative).sum() * scale, negative.sum() * scale)
    if "phi" in out.sequence_metrics:
        metrics["phi/zero_frac"] = _pair((out.sequence_metrics["phi"] < kernel.PHI_ZERO).sum() * scale, n_seq * scale)
    # the reference's approx_kl: the length-normalised sequence log-ratio, negated, over sequences
    per_token_log_ratio = stats.log_ratio_sum / stats.token_count.clamp(min=1)
    metrics["approx_kl"] = _pair(-per_token_log_ratio.sum() * scale, n_seq * scale)
    metrics["sequences"] = _pair(stats.advantages.new_tensor(n_seq * scale), n_seq * scale)
    metrics["sequences/adv_pos"] = _pair(positive.sum() * scale, positive.sum() * scale)
    metrics["sequences/adv_neg"] = _pair(negative.sum() * scale, negative.sum() * scale)
    return metrics


def _extreme(values: torch.Tensor, reduce, scale: float) -> torch.Tensor:
    """[max or min, count]; a rank that owns no sequences (or has none) gives the neutral element."""
    neutral = float("-inf") if reduce is torch.amax else float("inf")
    value = reduce(values.double()) if (values.numel() and scale) else values.new_tensor(neutral, dtype=torch.float64)
    return _pair(value, values.numel() * scale)


def model_device(model) -> torch.device:
    """Where a model chunk's parameters live; micro-batches, built on the host, are moved there."""
    return next(model.parameters()).device


def make_forward_step(cfg: LossConfig, groups: HookGroups | None = None,
                      chunk_tokens: int | None = None):
    """``forward_step_func`` for ``get_forward_backward_func()``; the iterator yields CP-local MicroBatches."""
    cfg.validate()

    def forward_step(data_iterator, model):
        mb: MicroBatch = next(data_iterator).to(model_device(model))
        hook_groups = groups or HookGroups.from_parallel_state()
        output = model(
            mb.tokens, mb.position_ids, None, packed_seq_params=mb.packed_seq_params()
        )
        return output, functools.partial(_loss_func, mb, cfg, hook_groups, chunk_tokens)

    return forward_step


def make_scoring_step(on_logprobs, temperature: float = 1.0, groups: HookGroups | None = None,
                      from_hidden: bool | None = None):
    """A forward-only ``forward_step_func`` that scores, the one every scoring pass uses (pi_old,
    ``score``, the mismatch study): the fp32 log-probs of the micro-batch's response tokens at
    ``temperature`` (vocab-parallel; the vocabulary is never gathered) are handed to
    ``on_logprobs(mb, rows, logp)`` on the last pipeline stage, on every TP rank, where ``rows``
    index the flattened micro-batch (on the model's device). The loss it returns is a zero:
    nothing is trained. Routing replay wraps it as it wraps the training step (``RoutingReplay.wrap``).

    ``from_hidden`` (default: where Megatron-Core has GPTModel's ``output_processor``, see
    mcore/versions.py) computes the log-probs from the last hidden states inside the model, a
    chunk of response rows at a time (:func:`logprobs.logprobs_from_hidden`), so the logits of
    the whole micro-batch never exist; otherwise the model returns its logits [b, s, vocab/tp]."""
    from megatron_vespo.mcore import versions

    if from_hidden is None:
        from_hidden = versions.has_output_processor()
    elif from_hidden and not versions.has_output_processor():
        raise RuntimeError(f"scoring from hidden states needs GPTModel's output_processor (megatron-core "
                           f">= 0.18); {versions.mcore_version()} is installed")

    def forward_step(data_iterator, model):
        host: MicroBatch = next(data_iterator)
        mb = host.to(model_device(model))
        hook_groups = groups or HookGroups.from_parallel_state()
        # found on the host (no device sync), then moved with the batch
        rows = host.loss_mask.reshape(-1).nonzero().squeeze(1).to(mb.labels.device)
        targets = mb.labels.reshape(-1)[rows]
        extra = {}
        if from_hidden:
            extra = dict(output_processor=_response_logprobs_processor,
                         output_processor_context=(rows, targets, temperature, hook_groups))
        output = model(mb.tokens, mb.position_ids, None, packed_seq_params=mb.packed_seq_params(), **extra)

        def loss_func(output):
            if from_hidden:
                logp = output
            else:
                logp, _ = vocab_parallel_logprobs(
                    output.reshape(-1, output.shape[-1]), rows, targets,
                    vocab_start=hook_groups.tp_rank * output.shape[-1], temperature=temperature,
                    group=hook_groups.tp)
            on_logprobs(mb, rows, logp.detach())
            return logp.new_zeros(()), torch.tensor(1, dtype=torch.int, device=logp.device), {}

        return output, loss_func

    return forward_step


def _response_logprobs_processor(*, hidden_states, output_layer, output_weight, scale_logits, context, **_):
    """GPTModel's ``output_processor`` for scoring: the response rows' log-probs, from the decoder's
    last hidden states [s (/tp under sequence parallelism), b, h] and the output layer's weight."""
    rows, targets, temperature, groups = context
    if getattr(output_layer, "sequence_parallel", False):
        hidden_states = comm.all_gather_stack(hidden_states, groups.tp, tag=SP_TAG).flatten(0, 1)
    if getattr(output_layer, "bias", None) is not None:
        raise NotImplementedError("scoring from hidden states assumes an output layer without a bias")
    weight = output_layer.weight if output_weight is None else output_weight
    hidden = hidden_states.transpose(0, 1).reshape(-1, hidden_states.shape[-1])[rows]  # [b, s] order
    logp, _ = logprobs_from_hidden(hidden, weight, targets, vocab_start=groups.tp_rank * weight.shape[0],
                                   temperature=temperature, group=groups.tp, scale_logits=scale_logits)
    return logp


def _loss_func(mb, cfg, groups, chunk_tokens, output_tensor):
    return loss_from_logits(output_tensor, mb, cfg, groups, chunk_tokens, inplace_grad=True)


def _reduction(name: str) -> str:
    return "max" if name.endswith("/max") else "min" if name.endswith("/min") else "sum"


def reduce_metrics(losses_reduced: list[dict]) -> dict[str, float]:
    """Reduce the hook's metric pairs over micro-batches and DP x CP, then send them from the last
    pipeline stage to every stage (so the logging rank, global rank 0, has them).

    Returns sum / count (a mean over the step), the sum for the TOTALS (tokens and sequences in the
    step), the extreme for names ending in /max or /min, and for names ending in /std the unbiased
    standard deviation over the step's sequences (from the sum of squares and the mean's pair)."""
    from megatron.core import parallel_state as ps

    last_stage = ps.is_pipeline_last_stage()
    pp_group = ps.get_pipeline_model_parallel_group()
    names = sorted(losses_reduced[0]) if (last_stage and losses_reduced) else None
    if ps.get_pipeline_model_parallel_world_size() > 1:
        names = comm.broadcast_object(names, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
    if not names:
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # NCCL reduces CUDA tensors only
    # sums and counts in one table; extremes in another (min negated, so one MAX reduces both)
    table = torch.zeros((len(names), 2), dtype=torch.float64, device=device)
    extremes = torch.full((len(names),), float("-inf"), dtype=torch.float64, device=device)
    sign = torch.tensor([-1.0 if _reduction(n) == "min" else 1.0 for n in names], dtype=torch.float64,
                        device=device)
    is_extreme = torch.tensor([_reduction(n) != "sum" for n in names], device=device)
    if last_stage:
        for entry in losses_reduced:
            values = torch.stack([entry[n].to(device=device, dtype=torch.float64) for n in names])
            table[:, 1] += values[:, 1]
            table[:, 0] += torch.where(is_extreme, 0.0, values[:, 0])
            extremes = torch.maximum(extremes, torch.where(is_extreme, values[:, 0] * sign, float("-inf")))
        dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
        comm.all_reduce_sum(table, dp_cp)
        if bool(is_extreme.any()):
            comm.all_reduce_max(extremes, dp_cp)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        comm.broadcast_(table, ps.get_pipeline_model_parallel_last_rank(), pp_group)
        comm.broadcast_(extremes, ps.get_pipeline_model_parallel_last_rank(), pp_group)
    sums = dict(zip(names, table.cpu().tolist()))
    out = {}
    for name, extreme in zip(names, (extremes * sign).cpu().tolist()):
        s, c = sums[name]
        if name in TOTALS:
            out[name] = s
        elif _reduction(name) != "sum":
            out[name] = extreme if c > 0 else float("nan")
        elif name.endswith("/std"):
            mean_sum, n = sums.get(name[: -len("/std")], (0.0, 0.0))
            out[name] = math.sqrt(max(s - mean_sum * mean_sum / n, 0.0) / (n - 1)) if n > 1 else float("nan")
        else:
            out[name] = s / c if c > 0 else float("nan")
    return out
