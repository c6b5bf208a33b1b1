"""Training-inference mismatch statistics: the engine's tokens scored by the engine and the trainer.

Pure numpy on per-sample arrays; no distributed code. The study that produces the arrays (engine
rollouts, a Megatron-Core forward, routing replay) is ``megatron_vespo.train.mismatch_study``.

Conventions. Responses are sampled from the engine mu; the trainer's policy is pi. Per response
token ``delta = log pi(y_t) - log mu(y_t)``, clamped to +-LOG_RATIO_CLAMP as the loss clamps it.
KL(mu || pi) = E_mu[-delta] is estimated per token with Schulman's estimators on mu's samples:

    k1 = -delta                      unbiased, high variance, can be negative
    k2 = delta^2 / 2                 biased, low variance
    k3 = exp(delta) - 1 - delta      unbiased, >= 0 (``losses.per_token_kl_k3(log pi, log mu)``)

The sequence log W = sum_t delta is the log importance weight pi/mu of the whole response: the
weight VESPO's kernel sees on the first step after a rollout when the mismatch is folded in
(``correction=fold``, pi_old = pi). phi(W) below ``kernel.PHI_ZERO`` counts as effectively zero:
that sequence contributes nothing to the gradient.

Routes are int32 ``[rows, num_layers, top_k]`` (all layers; dense layers ignored); row t holds the
experts token t was sent to. The engine returns ``prompt + response - 1`` rows, the trainer one
per token; the response tokens' rows are ``prompt_len - 1 .. end`` (row t computes token t + 1).
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_vespo import kernel, losses

QUANTILES = (0.5, 0.9, 0.99, 0.999)
PHI_LEVELS = (0.5, 0.1, 1e-3)  # besides PHI_ZERO: how strongly the kernel damps the sequences
HIST_EDGES = np.concatenate([[0.0], np.logspace(-8, 2, 41)])  # |delta| bins: exact zeros, then log


def token_deltas(train_logprobs, engine_logprobs) -> list[np.ndarray]:
    """Per sample: clamped log pi - log mu of each response token (float64)."""
    if len(train_logprobs) != len(engine_logprobs):
        raise ValueError(f"{len(train_logprobs)} trainer log-prob arrays for {len(engine_logprobs)} engine ones")
    out = []
    for i, (p, q) in enumerate(zip(train_logprobs, engine_logprobs)):
        p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
        if p.shape != q.shape:
            raise ValueError(f"sample {i}: trainer log-probs have shape {p.shape}, engine log-probs {q.shape}")
        if not (np.isfinite(p).all() and np.isfinite(q).all()):
            raise ValueError(f"sample {i}: log-probs are not finite")
        out.append(np.clip(p - q, -kernel.LOG_RATIO_CLAMP, kernel.LOG_RATIO_CLAMP))
    return out


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    out = {"mean": float(values.mean()), "min": float(values.min())}
    out.update({f"p{q * 100:g}": float(np.quantile(values, q)) for q in QUANTILES})
    out["max"] = float(values.max())
    return out


def kl_estimates(delta: np.ndarray) -> dict[str, float]:
    """Mean k1, k2, k3 estimates of KL(mu || pi) per token (and their standard errors)."""
    d = torch.from_numpy(np.asarray(delta, dtype=np.float64))
    per_token = {"k1": -d, "k2": 0.5 * d * d, "k3": losses.per_token_kl_k3(d, torch.zeros_like(d))}
    out = {}
    for name, values in per_token.items():
        values = values.numpy()
        out[name] = float(values.mean()) if values.size else float("nan")
        out[f"{name}_stderr"] = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else float("nan")
    return out


def token_report(deltas: list[np.ndarray]) -> dict:
    """|delta| distribution (quantiles and a log-spaced histogram) and the KL estimates."""
    d = np.concatenate(deltas) if deltas else np.zeros(0)
    a = np.abs(d)
    counts, _ = np.histogram(a, bins=HIST_EDGES)
    return {
        "tokens": int(d.size),
        "abs_delta": _quantiles(a),
        "delta": _quantiles(d),
        "frac_abs_delta_above": {str(t): float((a > t).mean()) if a.size else float("nan") for t in (0.01, 0.1, 1.0)},
        "histogram": {"edges": HIST_EDGES.tolist(), "counts": counts.tolist()},
        "kl": kl_estimates(d),
    }


def length_bins(lengths: np.ndarray, n_bins: int) -> list[tuple[int, int]]:
    """Inclusive response-length ranges holding about equally many sequences (lengths pile up at
    max_new_tokens); sequences of one length never straddle two bins."""
    values, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    bins, first, seen = [], 0, 0
    for i, count in enumerate(counts):
        seen += count
        if seen >= (len(bins) + 1) * lengths.size / n_bins or i == len(values) - 1:
            bins.append((int(values[first]), int(values[i])))
            first = i + 1
    return bins


def sequence_report(deltas: list[np.ndarray], loss_cfg: losses.LossConfig, n_bins: int = 6,
                    phi_zero: float = kernel.PHI_ZERO) -> dict:
    """Sequence log W and VESPO's phi(W) for either advantage sign, overall and by response length."""
    if not deltas:
        return {"sequences": 0}
    log_w = np.array([d.sum() for d in deltas])
    lengths = np.array([d.size for d in deltas])
    t = torch.from_numpy(log_w)
    params = dict(k_pos=loss_cfg.k_pos, lambda_pos=loss_cfg.lambda_pos, k_neg=loss_cfg.k_neg,
                  lambda_neg=loss_cfg.lambda_neg)
    phi_pos = kernel.phi(t, torch.ones_like(t), **params).numpy()
    phi_neg = kernel.phi(t, -torch.ones_like(t), **params).numpy()

    def summary(mask: np.ndarray) -> dict:
        return {"sequences": int(mask.sum()),
                "response_len": _quantiles(lengths[mask].astype(np.float64)),
                "log_w": _quantiles(log_w[mask]),
                "abs_log_w_mean": float(np.abs(log_w[mask]).mean()),
                "phi_zero_frac": {"adv_pos": float((phi_pos[mask] < phi_zero).mean()),
                                  "adv_neg": float((phi_neg[mask] < phi_zero).mean())},
                "phi_below": {str(level): {"adv_pos": float((phi_pos[mask] < level).mean()),
                                           "adv_neg": float((phi_neg[mask] < level).mean())} for level in PHI_LEVELS},
                "phi_mean": {"adv_pos": float(phi_pos[mask].mean()), "adv_neg": float(phi_neg[mask].mean())}}

    by_length = [{"len_from": low, "len_to": high, **summary((lengths >= low) & (lengths <= high))}
                 for low, high in length_bins(lengths, n_bins)]
    correlation = float(np.corrcoef(lengths, np.abs(log_w))[0, 1]) if np.ptp(lengths) and np.ptp(log_w) else 0.0
    return {**summary(np.ones(len(deltas), dtype=bool)), "phi_zero_threshold": phi_zero,
            "kernel": params, "by_length": by_length, "corr_len_abs_log_w": correlation,
            "per_sequence": {"response_len": lengths.tolist(), "log_w": log_w.tolist()}}


def routing_agreement_per_layer(engine_routes, trainer_routes, prompt_lens, moe_layers) -> dict:
    """How often the engine and the trainer sent a token to the same experts, per MoE layer.

    ``exact``: the fraction of (token, layer) pairs with the same top-k set; ``overlap``: the mean
    fraction of the k experts both chose. Over response tokens and over prompt tokens apart (the
    engine's prefill and decode kernels differ).
    """
    moe_layers = list(moe_layers)
    k = None
    sums = {part: {"exact": np.zeros(len(moe_layers)), "overlap": np.zeros(len(moe_layers)), "tokens": 0}
            for part in ("response", "prompt")}
    for i, (engine, trainer, start) in enumerate(zip(engine_routes, trainer_routes, prompt_lens)):
        engine, trainer = np.asarray(engine), np.asarray(trainer)
        if engine.ndim != 3 or trainer.ndim != 3 or engine.shape[1:] != trainer.shape[1:]:
            raise ValueError(f"sample {i}: routes of shape {engine.shape} (engine) and {trainer.shape} (trainer) "
                             f"do not match as [tokens, layers, top_k]")
        if trainer.shape[0] < engine.shape[0]:
            raise ValueError(f"sample {i}: the trainer has routes for {trainer.shape[0]} tokens, the engine for "
                             f"{engine.shape[0]}")
        k = engine.shape[2]
        rows = engine.shape[0]
        e = np.sort(engine[:, moe_layers], axis=-1)
        tr = np.sort(trainer[:rows, moe_layers], axis=-1)
        same = (e == tr).all(axis=-1)  # [rows, layers]
        # |intersection| of two sorted k-sets, by pairwise comparison (k is small)
        overlap = (e[..., :, None] == tr[..., None, :]).any(axis=-1).sum(axis=-1) / k
        split = max(start - 1, 0)
        for part, sl in (("prompt", slice(0, split)), ("response", slice(split, rows))):
            sums[part]["exact"] += same[sl].sum(axis=0)
            sums[part]["overlap"] += overlap[sl].sum(axis=0)
            sums[part]["tokens"] += same[sl].shape[0]
    out = {"moe_layers": moe_layers, "top_k": k}
    for part, s in sums.items():
        n = max(s["tokens"], 1)
        exact, overlap = s["exact"] / n, s["overlap"] / n
        out[part] = {"tokens": s["tokens"], "exact": exact.tolist(), "overlap": overlap.tolist(),
                     "exact_mean": float(exact.mean()) if moe_layers else float("nan"),
                     "overlap_mean": float(overlap.mean()) if moe_layers else float("nan")}
    return out


def routing_agreement(engine_routes, trainer_routes, dense_layers, prompt_lens) -> float:
    """Fraction of (response token, MoE layer) pairs routed to the same experts by both."""
    num_layers = np.asarray(engine_routes[0]).shape[1]
    moe_layers = [layer for layer in range(num_layers) if layer not in set(dense_layers)]
    return routing_agreement_per_layer(engine_routes, trainer_routes, prompt_lens, moe_layers)["response"]["exact_mean"]


def summary_lines(report: dict) -> list[str]:
    """A short terminal summary of one pass (``report`` as built by the study: token, sequence and
    optional routing parts)."""
    tok, seq = report["token"], report["sequence"]
    a, kl = tok["abs_delta"], tok["kl"]
    lines = [
        f"tokens {tok['tokens']}  |dlogp| mean {a['mean']:.3g}  p50 {a['p50']:.3g}  p99 {a['p99']:.3g}  "
        f"max {a['max']:.3g}",
        f"KL(engine||trainer) per token: k1 {kl['k1']:.3g}  k2 {kl['k2']:.3g}  k3 {kl['k3']:.3g}",
        f"sequences {seq['sequences']}  log W p50 {seq['log_w']['p50']:.3g}  |log W| mean {seq['abs_log_w_mean']:.3g}  "
        f"phi<{seq['phi_zero_threshold']:g}: {seq['phi_zero_frac']['adv_pos']:.1%} (A>0) "
        f"{seq['phi_zero_frac']['adv_neg']:.1%} (A<0)",
    ]
    for b in seq["by_length"]:
        span = f"{b['len_from']}-{b['len_to']}"
        lines.append(f"  length {span:<12} n {b['sequences']:>5}  |log W| mean "
                     f"{b['abs_log_w_mean']:.3g}  phi zero {b['phi_zero_frac']['adv_pos']:.1%}/"
                     f"{b['phi_zero_frac']['adv_neg']:.1%}")
    routing = report.get("routing")
    if isinstance(routing, dict) and "response" in routing:
        r = routing["response"]
        per_layer = " ".join(f"L{layer}:{x:.3f}" for layer, x in zip(routing["moe_layers"], r["exact"]))
        lines.append(f"routing agreement (response tokens, same top-{routing['top_k']} set): mean "
                     f"{r['exact_mean']:.3f}  overlap {r['overlap_mean']:.3f}  [{per_layer}]")
    elif isinstance(routing, str):
        lines.append(f"routing: {routing}")
    return lines
