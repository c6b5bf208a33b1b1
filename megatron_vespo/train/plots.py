"""The end-of-run picture: reward, entropy, VESPO's phi, the sequence weight W, the mismatch and
the gradient norm per parameter group (log scale, so a spike in one group stands out)."""

from __future__ import annotations

from megatron_vespo.train.grad_norms import GROUPS, METRIC_PREFIX

PANELS = (
    (("reward/mean",), "reward (rollout batch mean)", False),
    (("entropy",), "entropy (per response token)", False),
    (("phi",), "phi (VESPO kernel, mean over sequences)", False),
    (("w_seq",), "W (sequence importance weight)", False),
    (("mismatch/abs_logp_diff",), "|log pi_old - log mu| (train vs engine)", False),
    (("grad_norm",) + tuple(METRIC_PREFIX + g for g in GROUPS),
     "gradient norm (total and per group, before clipping; zeros left out)", True),
)


def plot_run(history: list[dict], path: str) -> str:
    """Write a 3x2 PNG of the metrics over optimizer steps; panels without data say so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(11, 10), sharex=True)
    steps = [row["step"] for row in history]
    for ax, (keys, title, log_scale) in zip(axes.flat, PANELS):
        drawn = 0
        for key in keys:
            # on a log scale a zero (a mini-batch whose advantages are all 0) is left out, not drawn
            points = [(s, row[key]) for s, row in zip(steps, history)
                      if row.get(key) is not None and (row[key] > 0 or not log_scale)]
            if not points:
                continue
            label = key.removeprefix(METRIC_PREFIX) if key != "grad_norm" else "total"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(keys) == 1 else None,
                    markersize=3, label=label, linewidth=1.5 if key == "grad_norm" or len(keys) == 1 else 1.0)
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, f"{keys[0]}: not logged by this loss/mode", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="gray")
        elif len(keys) > 1:
            ax.legend(fontsize=7, ncol=2)
        if log_scale and drawn:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
