#!/usr/bin/env python
"""Plot VESPO's kernel phi(W), its surrogate f(W), and every loss's effective gradient weight.

Panels: (1) phi(W) and f(W) for both advantage signs, with w* = k/lambda and sup phi marked;
(2) effective weights for A > 0; (3) effective weights for A < 0.

Effective weight. The weights are not re-derived: they are measured by autograd through the
project's own losses (``megatron_vespo.losses.compute_loss`` and ``aggregate``). For each W on the
grid the batch holds one sequence of T tokens (``--tokens``, default 1), every token with the same
log-ratio log(W)/T, so the sequence ratio is W and each token ratio is W^(1/T) (the token-level
losses GRPO, SAPO and CISPO see W^(1/T), not W). With advantage A = +1 or -1 and the
``seq_mean_token_mean`` aggregation (one sequence counts once whatever its length), the weight is

    weight(W) = -(n_seq / A) * sum_t d loss / d log pi_theta(token t)

i.e. the coefficient c in  grad = A * c * mean_t grad log pi_theta(t)  for that sequence, per unit
of advantage. On policy (W = 1) every loss here gives 1, and VESPO's weight is phi(W) itself, so the
panels compare the losses on the scale of the plain policy gradient. A weight of 0 means the loss
stops the gradient there (a clip or a gate).

Examples:

    python tools/plot_kernel.py --out kernel.png
    python tools/plot_kernel.py --k-pos 2 --lambda-pos 3 --k-neg 3 --lambda-neg 2 --w-max 3 \
        --out kernel.png --json weights.json

Exit status 2 with a one-line message naming the argument on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import warnings

import torch

# Megatron-Core (imported by the hook) warns about every missing GPU package; expected here
warnings.filterwarnings("ignore", module=r"megatron\.")

from megatron_vespo import kernel, losses  # noqa: E402
from megatron_vespo.hook import sequence_statistics  # noqa: E402
from megatron_vespo.losses import LossConfig, TokenBatch  # noqa: E402

# Any log-prob works (the losses see only differences); a plausible one keeps log pi <= 0 for
# per-token ratios up to e^8.
BASE_LOGP = -8.0
TABLE_W = (0.25, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0)
LABELS = {"vespo": "VESPO", "grpo": "GRPO (PPO-clip)", "gspo": "GSPO", "sapo": "SAPO",
          "cispo": "CISPO", "gmpo": "GMPO"}
# LossConfig fields the CLI exposes besides the kernel, with their constraint.
TUNABLES = {
    "clip_eps_low": "nonneg", "clip_eps_high": "nonneg", "dual_clip_c": "dual",
    "gspo_eps_low": "nonneg", "gspo_eps_high": "nonneg",
    "sapo_tau_pos": "pos", "sapo_tau_neg": "pos",
    "cispo_eps_low": "nonneg", "cispo_eps_high": "nonneg",
    "gmpo_log_clip": "pos",
}


class UsageError(Exception):
    """Bad command-line input; the message names the argument."""


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def effective_weights(cfg: LossConfig, w, sign: int, names=None, tokens: int = 1) -> dict[str, torch.Tensor]:
    """{loss name: effective weight at each W} for advantage ``sign`` (+1 or -1); see the module doc."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    w = torch.as_tensor(w, dtype=torch.float64).reshape(-1)
    n_seq = w.numel()
    seq_index = torch.arange(n_seq).repeat_interleave(tokens)
    token_lr = (torch.log(w) / tokens)[seq_index]
    old = torch.full_like(token_lr, BASE_LOGP)
    advantages = torch.full((n_seq,), float(sign), dtype=torch.float64)
    result = {}
    for name in names or list(losses.LOSSES):
        # No engine log-probs and no correction: the plot is about the loss itself.
        run_cfg = cfg.replace(name=name, correction="none", bypass=False, aggregation="seq_mean_token_mean")
        logp = (old + token_lr).requires_grad_(True)
        batch = TokenBatch(logp, old, None, torch.ones_like(logp), seq_index)
        stats = sequence_statistics(batch, advantages, n_seq, run_cfg, None)  # the hook's sums, one rank
        out, weights, _ = losses.compute_loss(stats, batch, run_cfg)
        total, normaliser = losses.aggregate(out.per_token_loss, weights, batch, stats, run_cfg.aggregation, True)
        (grad,) = torch.autograd.grad(total / normaliser, logp, allow_unused=True)
        if grad is None:  # a loss with no gradient path at all: weight 0 everywhere
            grad = torch.zeros_like(logp)
        per_seq = torch.zeros(n_seq, dtype=torch.float64).index_add_(0, seq_index, grad.detach())
        result[name] = -(float(normaliser) / sign) * per_seq
    return result


def _kernel_params(cfg: LossConfig) -> dict[str, tuple[float, float]]:
    return {"pos": (cfg.k_pos, cfg.lambda_pos), "neg": (cfg.k_neg, cfg.lambda_neg)}


def compute(cfg: LossConfig, w_max: float, points: int, tokens: int = 1, names=None) -> dict:
    """Everything the figure and the JSON show, as plain lists (JSON-ready: inf becomes None)."""
    names = names or list(losses.LOSSES)
    w = torch.linspace(0.0, w_max, points + 1, dtype=torch.float64)[1:]  # W = 0 has log W = -inf

    def finite(values):
        return [float(v) + 0.0 if math.isfinite(float(v)) else None for v in values]  # no -0.0

    data = {
        "params": {**{f: getattr(cfg, f) for f in ("k_pos", "lambda_pos", "k_neg", "lambda_neg")},
                   **{f: getattr(cfg, f) for f in TUNABLES},
                   "tokens": tokens, "w_max": w_max, "points": points},
        "normalisation": ("weight = -(n_seq/A) * sum_t dloss/dlogp_t with seq_mean_token_mean "
                          "aggregation: coefficient of A * mean_t grad log pi per unit advantage; "
                          f"one sequence of {tokens} token(s) per W, each token ratio W^(1/{tokens})"),
        "w": finite(w),
        "bounds": {}, "phi": {}, "surrogate": {}, "weights": {},
    }
    for sign_name, sign in (("pos", 1), ("neg", -1)):
        k, lam = _kernel_params(cfg)[sign_name]
        b = kernel.bounds(k, lam)
        data["bounds"][sign_name] = {"w_star": b.w_star, "sup_phi": b.sup_phi,
                                     "k_const": b.k_const if math.isfinite(b.k_const) else None}
        data["phi"][sign_name] = finite(kernel.phi_of_w(w, k, lam))
        data["surrogate"][sign_name] = finite(kernel.surrogate(w, k, lam))
        weights = effective_weights(cfg, w, sign, names, tokens)
        data["weights"][sign_name] = {name: finite(v) for name, v in weights.items()}
    return data


def table(cfg: LossConfig, w_max: float, tokens: int, names) -> str:
    """A few W values x losses, both signs, as fixed-width text."""
    w_values = sorted({v for v in TABLE_W if v <= w_max} | {w_max})
    lines = []
    for sign_name, sign in (("pos", 1), ("neg", -1)):
        k, lam = _kernel_params(cfg)[sign_name]
        weights = effective_weights(cfg, w_values, sign, names, tokens)
        phi = kernel.phi_of_w(torch.tensor(w_values), k, lam)
        header = f"A {'>' if sign > 0 else '<'} 0 (k={k:g}, lambda={lam:g}, w*={k / lam:.3g})"
        lines.append(header)
        lines.append("  " + f"{'W':>6} {'phi':>9}" + "".join(f" {n:>9}" for n in names))
        for i, wv in enumerate(w_values):
            # + 0.0 turns autograd's -0.0 (a stopped gradient times -1/A) into 0.0
            row = f"  {wv:6.3g} {float(phi[i]):9.4f}" + "".join(f" {float(weights[n][i]) + 0.0:9.4f}" for n in names)
            lines.append(row)
    return "\n".join(lines)


def _label(name: str, cfg: LossConfig, sign: int) -> str:
    base = LABELS.get(name, name.upper())
    if name == "vespo":
        k, lam = (cfg.k_pos, cfg.lambda_pos) if sign > 0 else (cfg.k_neg, cfg.lambda_neg)
        return f"{base} = phi (k={k:g}, λ={lam:g})"
    if name == "grpo":
        extra = f", c={cfg.dual_clip_c:g}" if (sign < 0 and cfg.dual_clip_c is not None) else ""
        return f"{base} ε=({cfg.clip_eps_low:g}, {cfg.clip_eps_high:g}){extra}"
    if name == "gspo":
        return f"{base} ε=({cfg.gspo_eps_low:g}, {cfg.gspo_eps_high:g})"
    if name == "sapo":
        return f"{base} τ={cfg.sapo_tau_pos if sign > 0 else cfg.sapo_tau_neg:g}"
    if name == "cispo":
        return f"{base} ε=({cfg.cispo_eps_low:g}, {cfg.cispo_eps_high:g})"
    if name == "gmpo":
        return f"{base} log-clip={cfg.gmpo_log_clip:g}"
    return base


def plot(data: dict, cfg: LossConfig, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = data["w"]
    tokens = data["params"]["tokens"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    colors = {"pos": "tab:blue", "neg": "tab:red"}
    ax = axes[0]
    for sign_name, sign_label in (("pos", "A>0"), ("neg", "A<0")):
        b = data["bounds"][sign_name]
        ax.plot(w, data["phi"][sign_name], color=colors[sign_name], label=f"phi(W), {sign_label}")
        ax.plot(w, data["surrogate"][sign_name], color=colors[sign_name], ls="--",
                label=f"f(W), {sign_label}")
        ax.axvline(b["w_star"], color=colors[sign_name], ls=":", lw=1)
        ax.plot([b["w_star"]], [b["sup_phi"]], marker="o", color=colors[sign_name], ls="none",
                label=f"w*={b['w_star']:.3g}, sup phi={b['sup_phi']:.3g} ({sign_label})")
    ax.set_title("VESPO kernel phi and surrogate f (f' = phi/W)")
    ax.set_xlabel("sequence importance ratio W")
    ax.set_ylabel("value")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    for ax, (sign_name, sign) in zip(axes[1:], (("pos", 1), ("neg", -1))):
        for name, values in data["weights"][sign_name].items():
            style = {"lw": 2.5, "color": "black"} if name == "vespo" else {"lw": 1.3}
            ax.plot(w, values, label=_label(name, cfg, sign), **style)
        b = data["bounds"][sign_name]
        ax.axvline(b["w_star"], color="gray", ls=":", lw=1, label=f"w* = k/λ = {b['w_star']:.3g}")
        ax.axhline(b["sup_phi"], color="gray", ls="--", lw=0.8, label=f"sup phi = {b['sup_phi']:.3g}")
        ax.axvline(1.0, color="gray", lw=0.5)
        ax.set_title(f"effective gradient weight, A {'> 0' if sign > 0 else '< 0'}")
        ax.set_xlabel(f"sequence ratio W ({tokens} token(s), token ratio W^(1/{tokens}))")
        ax.set_ylabel("weight on grad log pi per unit |A| (1 = on-policy PG)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"VESPO k+={cfg.k_pos:g}, λ+={cfg.lambda_pos:g}, k-={cfg.k_neg:g}, λ-={cfg.lambda_neg:g}; "
        f"weights by autograd through megatron_vespo.losses, {tokens} token(s) per sequence"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _dual_clip(text: str):
    return None if text.lower() in ("none", "off") else float(text)


def parse_args(argv=None) -> argparse.Namespace:
    defaults = LossConfig()
    p = _Parser(prog="plot_kernel.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in ("k_pos", "lambda_pos", "k_neg", "lambda_neg"):
        p.add_argument(_flag(field), type=float, default=getattr(defaults, field),
                       help=f"VESPO kernel {field} (default {getattr(defaults, field):g}, from megatron_vespo.kernel)")
    p.add_argument("--w-max", type=float, default=3.0, help="right end of the W axis (default 3)")
    p.add_argument("--points", type=int, default=600, help="grid points on (0, w-max] (default 600)")
    p.add_argument("--tokens", type=int, default=1,
                   help="tokens per sequence; each token's log-ratio is log(W)/T (default 1)")
    p.add_argument("--losses", default=",".join(losses.LOSSES),
                   help=f"comma-separated subset of {','.join(losses.LOSSES)} (default all)")
    for field, kind in TUNABLES.items():
        default = getattr(defaults, field)
        p.add_argument(_flag(field), type=_dual_clip if kind == "dual" else float, default=default,
                       help=f"LossConfig.{field} (default {default}{'; none disables' if kind == 'dual' else ''})")
    p.add_argument("--out", default="kernel.png", help="PNG path (default kernel.png)")
    p.add_argument("--json", default=None, help="also write the curves as JSON here")
    return p.parse_args(argv)


def _check_writable(path: str, flag: str) -> None:
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path!r} is not writable")


def validate(args: argparse.Namespace) -> tuple[LossConfig, list[str]]:
    for field in ("k_pos", "lambda_pos", "k_neg", "lambda_neg", "w_max"):
        value = getattr(args, field)
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{_flag(field)} must be a finite number > 0, got {value:g}")
    if args.points < 2:
        raise UsageError(f"--points must be >= 2, got {args.points}")
    if args.tokens < 1:
        raise UsageError(f"--tokens must be >= 1, got {args.tokens}")
    for field, kind in TUNABLES.items():
        value = getattr(args, field)
        if kind == "dual":
            if value is not None and not (math.isfinite(value) and value > 1):
                raise UsageError(f"{_flag(field)} must be > 1 or 'none', got {value:g}")
        elif not math.isfinite(value) or value < 0 or (kind == "pos" and value == 0):
            raise UsageError(f"{_flag(field)} must be {'> 0' if kind == 'pos' else '>= 0'}, got {value:g}")
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    unknown = [n for n in names if n not in losses.LOSSES]
    if unknown or not names:
        raise UsageError(f"--losses: unknown {unknown or 'empty list'}; choose from {','.join(losses.LOSSES)}")
    _check_writable(args.out, "--out")
    if args.json:
        _check_writable(args.json, "--json")
    cfg = LossConfig(k_pos=args.k_pos, lambda_pos=args.lambda_pos, k_neg=args.k_neg,
                     lambda_neg=args.lambda_neg, **{f: getattr(args, f) for f in TUNABLES}).validate()
    return cfg, names


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, names = validate(args)
    except UsageError as exc:
        print(f"plot_kernel.py: error: {exc}", file=sys.stderr)
        return 2
    data = compute(cfg, args.w_max, args.points, args.tokens, names)
    try:
        plot(data, cfg, args.out)
    except OSError as exc:
        print(f"plot_kernel.py: error: --out {args.out!r}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1, allow_nan=False)
        except OSError as exc:
            print(f"plot_kernel.py: error: --json {args.json!r}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    print(f"effective gradient weight per unit advantage ({args.tokens} token(s) per sequence; "
          f"VESPO's is phi):")
    print(table(cfg, args.w_max, args.tokens, names))
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
