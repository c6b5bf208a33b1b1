"""The VESPO kernel phi(W) = W^k * exp(lambda * (1 - W)) and its bound constants.

Pure math: no distributed code. ``seq_log_w`` is the per-sequence sum of per-token log-ratios
(each already clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] by whoever formed it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_RATIO_CLAMP = 20.0
MIN_LOG_W = math.log(1e-8)
MAX_LOG_W = 20.0
PHI_ZERO = 1e-6  # phi below this counts as "effectively zero": the sequence adds no gradient

DEFAULT_K_POS, DEFAULT_LAMBDA_POS = 2.0, 3.0
DEFAULT_K_NEG, DEFAULT_LAMBDA_NEG = 3.0, 2.0


def phi(
    seq_log_w: torch.Tensor,
    seq_adv: torch.Tensor,
    k_pos: float = DEFAULT_K_POS,
    lambda_pos: float = DEFAULT_LAMBDA_POS,
    k_neg: float = DEFAULT_K_NEG,
    lambda_neg: float = DEFAULT_LAMBDA_NEG,
) -> torch.Tensor:
    """Per-sequence phi(W), detached. A >= 0 uses (k_pos, lambda_pos), A < 0 (k_neg, lambda_neg).

    Evaluated in log space (log phi = k log W + lambda (1 - W)) and exponentiated last; the
    sequence log W is clamped to [log(1e-8), 20]; a non-finite result becomes 0.
    """
    if seq_log_w.shape != seq_adv.shape:
        raise ValueError(
            f"phi: seq_log_w has shape {tuple(seq_log_w.shape)} but seq_adv has "
            f"{tuple(seq_adv.shape)}; both must be one value per sequence"
        )
    with torch.no_grad():
        log_w = seq_log_w.detach().double().clamp(MIN_LOG_W, MAX_LOG_W)
        positive = seq_adv.detach() >= 0
        k = torch.where(positive, log_w.new_tensor(k_pos), log_w.new_tensor(k_neg))
        lam = torch.where(positive, log_w.new_tensor(lambda_pos), log_w.new_tensor(lambda_neg))
        value = torch.exp(k * log_w + lam * (1.0 - torch.exp(log_w)))
        value = torch.where(torch.isfinite(value), value, torch.zeros_like(value))
    return value.to(seq_log_w.dtype if seq_log_w.is_floating_point() else torch.float32)


def phi_of_w(w: torch.Tensor, k: float, lam: float) -> torch.Tensor:
    """phi evaluated directly at ratio values W (no clamping), for plots and bound checks."""
    w = torch.as_tensor(w, dtype=torch.float64)
    return w.pow(k) * torch.exp(lam * (1.0 - w))


@dataclass(frozen=True)
class KernelBounds:
    w_star: float  # argmax of phi
    sup_phi: float  # phi(w_star)
    k_const: float  # sup_w phi(w) / w (inf for k < 1)


def bounds(k: float, lam: float) -> KernelBounds:
    """Closed-form bound constants (paper Prop. 3.1 and C.1)."""
    if k <= 0 or lam <= 0:
        raise ValueError(f"bounds: k and lambda must be > 0, got k={k}, lambda={lam}")
    w_star = k / lam
    sup_phi = (k / lam) ** k * math.exp(lam - k)
    if k < 1:
        k_const = math.inf
    else:
        k_const = ((k - 1) / lam) ** (k - 1) * math.exp(lam - k + 1)
    return KernelBounds(w_star=w_star, sup_phi=sup_phi, k_const=k_const)


def surrogate(w: torch.Tensor, k: float, lam: float) -> torch.Tensor:
    """The implied surrogate f with f' = phi(W)/W and f(0) = 0.

    f(W) = e^lambda * Gamma(k) / lambda^k * P(k, lambda W), P the regularised lower incomplete
    gamma function.
    """
    w = torch.as_tensor(w, dtype=torch.float64)
    scale = math.exp(lam) * math.gamma(k) / lam**k
    return scale * torch.special.gammainc(torch.full_like(w, k), lam * w)
