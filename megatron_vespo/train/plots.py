"""The end-of-run picture: reward, VESPO's phi, the sequence weight W and the mismatch per step."""

from __future__ import annotations

PANELS = (
    ("reward/mean", "reward (rollout batch mean)"),
    ("phi", "phi (VESPO kernel, mean over sequences)"),
    ("w_seq", "W (sequence importance weight)"),
    ("mismatch/abs_logp_diff", "|log pi_old - log mu| (train vs engine)"),
)


def plot_run(history: list[dict], path: str) -> str:
    """Write a 2x2 PNG of the metrics over optimizer steps; panels without data say so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    steps = [row["step"] for row in history]
    for ax, (key, title) in zip(axes.flat, PANELS):
        values = [row.get(key) for row in history]
        points = [(s, v) for s, v in zip(steps, values) if v is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        else:
            ax.text(0.5, 0.5, f"{key}: not logged by this loss/mode", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="gray")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
