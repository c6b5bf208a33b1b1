"""Policy losses over per-sequence statistics and local per-token tensors.

Pure math: no distributed code. The hook (``megatron_vespo.hook``) forms the per-sequence sums
across context-parallel ranks and hands each loss:

* :class:`SequenceStats` -- one row per sequence, global (identical on every CP rank), detached;
* :class:`TokenBatch` -- this rank's tokens: log pi_theta (with grad), pi_old, engine log-probs,
  mask and the index of each token's sequence.

Every loss returns a per-token surrogate whose gradient, summed over a sequence's tokens wherever
they live, is the gradient of the method's objective. Sequence-level factors enter as detached
per-sequence values, so no per-token tensor ever crosses ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_vespo import kernel, ranges
from megatron_vespo.kernel import LOG_RATIO_CLAMP

CORRECTIONS = ("none", "tis", "mis", "fold")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "legacy_microbatch_token_mean",
)


# The range of every numeric LossConfig field (interval notation, megatron_vespo.ranges), checked by
# LossConfig.validate: a value outside, NaN or an infinity is an error naming the field. Not here:
# dual_clip_c (> 1 or None), and mis_low < mis_high (a rule between two fields).
BOUNDS = {
    "k_pos": "(0, inf)",  # the kernel W^k exp(lambda (1 - W)) peaks at W = k / lambda (kernel.bounds)
    "lambda_pos": "(0, inf)",
    "k_neg": "(0, inf)",
    "lambda_neg": "(0, inf)",
    "clip_eps_low": "[0, inf)",
    "clip_eps_high": "[0, inf)",
    "gspo_eps_low": "[0, inf)",
    "gspo_eps_high": "[0, inf)",
    "sapo_tau_pos": "(0, inf)",  # the gate divides by tau
    "sapo_tau_neg": "(0, inf)",
    "cispo_eps_low": "[0, inf)",
    "cispo_eps_high": "[0, inf)",
    "gmpo_log_clip": "(0, inf)",  # 0 leaves no room between the clip bounds
    "tis_cap": "(0, inf)",
    "mis_low": "(0, inf)",
    "mis_high": "(0, inf)",
    "temperature": "(0, inf)",
    "kl_coef": "[0, inf)",
    "entropy_coef": "[0, inf)",
}


@dataclass
class LossConfig:
    """Settings of every policy loss; one object so matched comparisons share everything else."""

    name: str = "vespo"  # vespo | grpo | gspo | sapo | cispo | gmpo
    # VESPO kernel (k, lambda) by advantage sign.
    k_pos: float = kernel.DEFAULT_K_POS  # kernel power k for A >= 0
    lambda_pos: float = kernel.DEFAULT_LAMBDA_POS  # kernel rate lambda for A >= 0
    k_neg: float = kernel.DEFAULT_K_NEG  # kernel power k for A < 0
    lambda_neg: float = kernel.DEFAULT_LAMBDA_NEG  # kernel rate lambda for A < 0
    # GRPO / PPO-clip (token level), with dual clip for negative advantages.
    clip_eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    clip_eps_high: float = 0.28  # ratio clipped above at 1 + eps_high
    dual_clip_c: float | None = 3.0  # A < 0: the loss is capped at c * |A| (None: no dual clip)
    # GSPO: clip on the geometric-mean sequence ratio.
    gspo_eps_low: float = 3e-4  # sequence ratio clipped below at 1 - eps_low
    gspo_eps_high: float = 4e-4  # sequence ratio clipped above at 1 + eps_high
    # SAPO: soft sigmoid gate temperatures.
    sapo_tau_pos: float = 1.0  # gate temperature for A > 0
    sapo_tau_neg: float = 1.05  # gate temperature for A <= 0
    # CISPO: clipped, stop-gradient token weight; a low bound of 1 means no lower clip.
    cispo_eps_low: float = 1.0  # weight clipped below at 1 - eps_low
    cispo_eps_high: float = 0.28  # weight clipped above at 1 + eps_high
    # GMPO: clip of the token log-ratio, in log space.
    gmpo_log_clip: float = 0.4  # token log-ratio clipped to +-this, by advantage sign
    # Rollout-engine (training-inference mismatch) correction.
    correction: str = "none"  # none | tis | mis | fold (VESPO only)
    tis_cap: float = 2.0  # tis: per-token weight min(pi_old/mu, cap)
    mis_low: float = 0.5  # mis: tokens with pi_old/mu below this are masked
    mis_high: float = 2.0  # mis: tokens with pi_old/mu above this are masked
    # pi_old := engine log-probs (no recompute forward); the mismatch term is then zero.
    bypass: bool = False
    aggregation: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum | legacy_microbatch_token_mean
    temperature: float = 1.0  # log-probs are log_softmax(logits / temperature), as the engine samples
    # Regularisers, aggregated like the policy loss but without the TIS/MIS weights (see regularizer).
    kl_coef: float = 0.0  # KL(pi_theta || pi_ref) penalty; needs the reference log-probs
    kl_estimator: str = "k3"  # k1 | k2 | k3 (per token, from pi_theta's samples)
    entropy_coef: float = 0.0  # entropy bonus: the loss subtracts entropy_coef x the token entropy

    def validate(self) -> "LossConfig":
        if self.name not in LOSSES:
            raise ValueError(f"unknown loss {self.name!r}; choose one of {sorted(LOSSES)}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"unknown correction {self.correction!r}; choose one of {CORRECTIONS}")
        if self.correction == "fold" and self.name != "vespo":
            raise ValueError(
                f"correction 'fold' folds the mismatch into VESPO's W and is only defined for "
                f"vespo, not {self.name!r}; use 'tis' or 'mis'"
            )
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {self.kl_estimator!r}; choose one of {KL_ESTIMATORS}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"unknown aggregation {self.aggregation!r}; choose one of {AGGREGATIONS}"
            )
        for key, interval in BOUNDS.items():
            ranges.check(key, getattr(self, key), interval)
        if not self.mis_low < self.mis_high:
            raise ValueError(f"need 0 < mis_low < mis_high, got {self.mis_low}, {self.mis_high}")
        if self.dual_clip_c is not None and not ranges.contains("(1, inf)", self.dual_clip_c):
            raise ValueError(f"dual_clip_c must be > 1 (or None), got {self.dual_clip_c}")
        return self

    def replace(self, **changes) -> "LossConfig":
        return dataclasses.replace(self, **changes).validate()


@dataclass
class SequenceStats:
    """Global per-sequence values (summed over all CP ranks), all detached, shape [n_seq]."""

    log_ratio_sum: torch.Tensor  # sum_t clamp(log pi_theta - log pi_old)
    mismatch_sum: torch.Tensor  # sum_t clamp(log pi_old - log mu); zero without engine log-probs
    token_count: torch.Tensor
    advantages: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TokenBatch:
    """This rank's response tokens, shape [n_tok]; ``logp`` carries the gradient."""

    logp: torch.Tensor
    old_logp: torch.Tensor
    engine_logp: torch.Tensor | None
    mask: torch.Tensor  # float, 1 for a response token that enters the loss
    seq_index: torch.Tensor  # long, row of SequenceStats for each token
    ref_logp: torch.Tensor | None = None  # the reference policy's log-probs (KL term)

    def token_log_ratio(self) -> torch.Tensor:
        """Clamped log pi_theta - log pi_old, with gradient (zero outside the clamp)."""
        return (self.logp - self.old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)

    def token_mismatch(self) -> torch.Tensor:
        """Clamped log pi_old - log mu (detached); zero when the engine log-probs are absent."""
        if self.engine_logp is None:
            return torch.zeros_like(self.old_logp)
        return (self.old_logp - self.engine_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


@dataclass
class LossOutput:
    per_token_loss: torch.Tensor  # [n_tok], unmasked; aggregation applies mask and weights
    token_metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token values
    sequence_metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # per-seq values


def _adv_tok(stats: SequenceStats, tokens: TokenBatch) -> torch.Tensor:
    return stats.advantages[tokens.seq_index].to(tokens.logp.dtype)


def sequence_log_w(stats: SequenceStats, cfg: LossConfig) -> torch.Tensor:
    """VESPO's sequence log W: sum of log-ratios (+ mismatch when folded), before the kernel clamp."""
    log_w = stats.log_ratio_sum
    if cfg.correction == "fold":
        log_w = log_w + stats.mismatch_sum
    return log_w


def vespo_loss(stats: SequenceStats, tokens: TokenBatch, cfg: LossConfig) -> LossOutput:
    log_w = sequence_log_w(stats, cfg)
    seq_phi = kernel.phi(log_w, stats.advantages, cfg.k_pos, cfg.lambda_pos, cfg.k_neg, cfg.lambda_neg)
    coef = (seq_phi * stats.advantages.to(seq_phi))[tokens.seq_index]
    loss = -coef.detach().to(tokens.logp.dtype) * tokens.logp
    clamped = log_w.clamp(kernel.MIN_LOG_W, kernel.MAX_LOG_W)
    return LossOutput(loss, sequence_metrics={"phi": seq_phi, "log_w": clamped, "w_seq": clamped.exp()})


def grpo_loss(stats: SequenceStats, tokens: TokenBatch, cfg: LossConfig) -> LossOutput:
    adv = _adv_tok(stats, tokens)
    ratio = tokens.token_log_ratio().exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    loss = torch.maximum(unclipped, clipped)
    metrics = {"clip_frac": (clipped > unclipped).float().detach()}
    if cfg.dual_clip_c is not None:
        bound = -adv * cfg.dual_clip_c  # positive where adv < 0
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound.detach(), loss)
        metrics["dual_clip_frac"] = dual.float().detach()
    return LossOutput(loss, token_metrics=metrics)


def gspo_loss(stats: SequenceStats, tokens: TokenBatch, cfg: LossConfig) -> LossOutput:
    adv = _adv_tok(stats, tokens)
    seq_log_s = stats.log_ratio_sum / stats.token_count.clamp(min=1)
    # Value exp(mean log-ratio) of the sequence, gradient s * grad log pi_theta(token).
    log_s = seq_log_s[tokens.seq_index].to(tokens.logp.dtype) + tokens.logp - tokens.logp.detach()
    s = log_s.exp()
    unclipped = -adv * s
    clipped = -adv * s.clamp(1.0 - cfg.gspo_eps_low, 1.0 + cfg.gspo_eps_high)
    loss = torch.maximum(unclipped, clipped)
    return LossOutput(
        loss,
        token_metrics={"clip_frac": (clipped > unclipped).float().detach()},
        sequence_metrics={"w_seq": seq_log_s.exp()},
    )


def sapo_loss(stats: SequenceStats, tokens: TokenBatch, cfg: LossConfig) -> LossOutput:
    adv = _adv_tok(stats, tokens)
    ratio = tokens.token_log_ratio().exp()
    tau = torch.where(adv > 0, ratio.new_tensor(cfg.sapo_tau_pos), ratio.new_tensor(cfg.sapo_tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    return LossOutput(-adv * gate)


def cispo_loss(stats: SequenceStats, tokens: TokenBatch, cfg: LossConfig) -> LossOutput:
    adv = _adv_tok(stats, tokens)
    ratio = tokens.token_log_ratio().detach().exp()
    low, high = max(0.0, 1.0 - cfg.cispo_eps_low), 1.0 + cfg.cispo_eps_high
    weight = ratio.clamp(low, high)
    clipped = ((ratio < low) | (ratio > high)).float()
    return LossOutput(-weight * adv * tokens.logp, token_metrics={"clip_frac": clipped})


def _gmpo_token_log_ratio(tokens: TokenBatch, adv: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    log_ratio = tokens.token_log_ratio()
    clipped = log_ratio.clamp(-cfg.gmpo_log_clip, cfg.gmpo_log_clip)
    # sign-aware min of (r A, clip(r) A) in log space
    return torch.where(adv >= 0, torch.minimum(log_ratio, clipped), torch.maximum(log_ratio, clipped))


def gmpo_sequence_sums(tokens: TokenBatch, adv_tok: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    return {"gmpo_log_ratio": _gmpo_token_log_ratio(tokens, adv_tok, cfg).detach()}


def gmpo_loss(stats: SequenceStats, tokens: TokenBatch, cfg: LossConfig) -> LossOutput:
    adv = _adv_tok(stats, tokens)
    token_term = _gmpo_token_log_ratio(tokens, adv, cfg)
    seq_mean = stats.extra["gmpo_log_ratio"] / stats.token_count.clamp(min=1)
    # Value exp(mean clipped log-ratio) of the sequence; gradient flows through this token's term.
    log_g = seq_mean[tokens.seq_index].to(token_term.dtype) + token_term - token_term.detach()
    return LossOutput(
        -adv * log_g.exp(),
        token_metrics={"clip_frac": (token_term.detach() != tokens.token_log_ratio().detach()).float()},
        sequence_metrics={"w_seq": seq_mean.exp()},
    )


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[[SequenceStats, TokenBatch, LossConfig], LossOutput]
    # Extra detached per-token values the loss needs summed per sequence (same all-reduce).
    sequence_sums: Callable[[TokenBatch, torch.Tensor, LossConfig], dict[str, torch.Tensor]] | None = None


LOSSES: dict[str, LossSpec] = {
    "vespo": LossSpec(vespo_loss),
    "grpo": LossSpec(grpo_loss),
    "gspo": LossSpec(gspo_loss),
    "sapo": LossSpec(sapo_loss),
    "cispo": LossSpec(cispo_loss),
    "gmpo": LossSpec(gmpo_loss, gmpo_sequence_sums),
}


def correction_weights(tokens: TokenBatch, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token multiplier (detached) for TIS/MIS, and its metrics."""
    ones = torch.ones_like(tokens.old_logp)
    if cfg.correction in ("none", "fold") or cfg.bypass:
        return ones, {}
    if tokens.engine_logp is None:
        raise ValueError(f"correction {cfg.correction!r} needs the engine's per-token log-probs")
    ratio = tokens.token_mismatch().exp()
    if cfg.correction == "tis":
        return ratio.clamp(max=cfg.tis_cap), {"tis_truncated_frac": (ratio > cfg.tis_cap).float()}
    keep = ((ratio >= cfg.mis_low) & (ratio <= cfg.mis_high)).float()
    return keep, {"mis_masked_frac": 1.0 - keep}


def per_token_kl_k3(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(q || p) from samples of q: exp(p - q) - (p - q) - 1 >= 0. The engine's
    samples make the mismatch KL(mu || pi_old) = per_token_kl_k3(log pi_old, log mu)."""
    d = (log_p - log_q).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return d.exp() - d - 1.0


def per_token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """An estimate of KL(pi_theta || pi_ref) per token sampled from pi_theta (Schulman's k1, k2,
    k3), with the gradient through ``logp``: k1 = log r, k2 = (log r)^2 / 2, k3 = 1/r - 1 + log r,
    r = pi_theta / pi_ref (k3 is per_token_kl_k3(ref, pi), clamped the same way)."""
    log_r = (logp - ref_logp.to(logp.dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return log_r
    if estimator == "k2":
        return 0.5 * log_r * log_r
    if estimator == "k3":
        return (-log_r).exp() - 1.0 + log_r
    raise ValueError(f"unknown kl_estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def regularizer(tokens: TokenBatch, entropy: torch.Tensor | None,
                cfg: LossConfig) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The per-token KL penalty and entropy bonus, kl_coef x KL - entropy_coef x H (None when both
    are off), and their per-token values as metrics. Aggregated with the policy loss's
    normaliser, but not multiplied by TIS/MIS weights: they correct the policy gradient's sampling
    distribution, while both terms are expectations under pi_theta's own samples."""
    term, metrics = None, {}
    if cfg.kl_coef > 0:
        if tokens.ref_logp is None:
            raise ValueError("kl_coef > 0 needs the reference policy's per-token log-probs")
        kl = per_token_kl(tokens.logp, tokens.ref_logp, cfg.kl_estimator)
        term = cfg.kl_coef * kl
        metrics[f"kl_ref/{cfg.kl_estimator}"] = kl.detach()
    if cfg.entropy_coef > 0:
        if entropy is None or not entropy.requires_grad:
            raise ValueError("entropy_coef > 0 needs the token entropy with its gradient")
        bonus = -cfg.entropy_coef * entropy.to(tokens.logp.dtype)
        term = bonus if term is None else term + bonus
    return term, metrics


def aggregate(
    per_token_loss: torch.Tensor,
    weights: torch.Tensor,
    tokens: TokenBatch,
    stats: SequenceStats,
    aggregation: str,
    owns_sequences: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(local loss sum, local normaliser) for Megatron's ``calculate_per_token_loss`` contract.

    Megatron sums both over micro-batches and DP x CP ranks and divides. Per-sequence normalisers
    are contributed by exactly one CP rank (``owns_sequences``) so each sequence counts once.
    """
    weighted = per_token_loss * weights * tokens.mask
    one = torch.ones((), dtype=torch.float32, device=per_token_loss.device)
    owner = one * (1.0 if owns_sequences else 0.0)
    # a sequence without any token in the loss (Sample.trained false) is not counted; kept on the
    # device (no host sync per micro-batch)
    n_seq = owner * (stats.token_count > 0).sum()
    if aggregation == "token_mean":
        return weighted.sum(), tokens.mask.sum().float()
    if aggregation == "seq_mean_token_mean":
        length = stats.token_count[tokens.seq_index].to(weighted.dtype)
        return (weighted / length).sum(), n_seq
    if aggregation == "seq_mean_token_sum":
        return weighted.sum(), n_seq
    if aggregation == "legacy_microbatch_token_mean":
        total = stats.token_count.sum().to(weighted.dtype)
        trained = total > 0  # a micro-batch with nothing trained (sum 0) is not one of the means
        return weighted.sum() / torch.where(trained, total, torch.ones_like(total)), owner * trained
    raise ValueError(f"unknown aggregation {aggregation!r}")


def sequence_sums_for(cfg: LossConfig, tokens: TokenBatch, adv_tok: torch.Tensor) -> dict[str, torch.Tensor]:
    spec = LOSSES[cfg.name]
    return spec.sequence_sums(tokens, adv_tok, cfg) if spec.sequence_sums else {}


def compute_loss(stats: SequenceStats, tokens: TokenBatch, cfg: LossConfig) -> tuple[LossOutput, torch.Tensor, dict]:
    """Run the configured loss; return its output, the correction weights and their metrics."""
    out = LOSSES[cfg.name].fn(stats, tokens, cfg)
    weights, corr_metrics = correction_weights(tokens, cfg)
    return out, weights, corr_metrics

