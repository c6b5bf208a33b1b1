"""The end-of-run picture: reward, entropy, VESPO's phi, the sequence weight W, the mismatch and
the gradient norm per parameter group (log scale, so a spike in one group stands out); with
held-out evaluation rows (``eval/...``, train/evaluation.py) also avg@n and pass@k per set and the
response lengths of rollouts and evaluations."""

from __future__ import annotations

from megatron_vespo.train.evaluation import EVAL_PREFIX
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

LABELS = {"grad_norm": "total", "response_len/mean": "rollouts"}


def eval_panels(history: list[dict]) -> tuple:
    """The panels of the held-out evaluation: avg@n and pass@k of every set logged, and the
    response lengths (rollouts and each set); none when no row holds an evaluation."""
    keys = sorted({key for row in history for key in row if key.startswith(EVAL_PREFIX)})
    scores = tuple(k for k in keys if k.count("/") == 2 and k.rsplit("/", 1)[1].startswith(("avg@", "pass@")))
    if not scores:
        return ()
    lengths = ("response_len/mean",) + tuple(k for k in keys if k.endswith("/response_len"))
    return ((scores, "held-out evaluation (avg@n solid, pass@k dashed)", False),
            (lengths, "response length (tokens: rollouts, evaluation sets)", False))


def plot_run(history: list[dict], path: str) -> str:
    """Write a PNG of the metrics over optimizer steps (3x2 panels; 4x2 with evaluation rows);
    panels without data say so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = PANELS + eval_panels(history)
    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(11, 10 * len(panels) / 6), sharex=True)
    steps = [row["step"] for row in history]
    for ax, (keys, title, log_scale) in zip(axes.flat, panels):
        drawn = 0
        for key in keys:
            # on a log scale a zero (a mini-batch whose advantages are all 0) is left out, not drawn
            points = [(s, row[key]) for s, row in zip(steps, history)
                      if row.get(key) is not None and (row[key] > 0 or not log_scale)]
            if not points:
                continue
            label = LABELS.get(key, key.removeprefix(METRIC_PREFIX).removeprefix(EVAL_PREFIX))
            # evaluations are few points: markers; rollouts and the grad norms are dense lines
            sparse = len(keys) == 1 or key.startswith(EVAL_PREFIX)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if sparse else None,
                    markersize=3, label=label, linestyle="--" if "/pass@" in key else "-",
                    linewidth=1.5 if key == "grad_norm" or len(keys) == 1 else 1.0)
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
