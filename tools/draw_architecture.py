#!/usr/bin/env python
"""Draw docs/architecture.png: the data flow of one rollout batch through megatron_vespo.

    python tools/draw_architecture.py [--out docs/architecture.png]

Boxes and arrows with matplotlib (Agg backend, no display needed); 1500 x 1050 pixels.
docs/ARCHITECTURE.md explains the picture.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "architecture.png"

WIDTH, HEIGHT, DPI = 15.0, 10.5, 100  # inches: 1500 x 1050 px

COLORS = {
    "engine": ("#dbe9f6", "#2f6ea5"),
    "data": ("#eeeeee", "#666666"),
    "trainer": ("#fdebd3", "#c0701f"),
    "hook": ("#fff7d6", "#b08a00"),
    "sync": ("#eadff3", "#7040a0"),
    "store": ("#e3f1e0", "#3d7a34"),
}


def box(ax, x, y, w, h, title, lines=(), kind="data", title_size=12.5, body_size=10.0, inner=False):
    face, edge = COLORS[kind]
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                facecolor=face if not inner else "white", edgecolor=edge,
                                linewidth=1.4 if inner else 2.0, zorder=2 if inner else 1))
    ax.text(x + 0.15, y + h - 0.14, title, ha="left", va="top", fontsize=title_size, fontweight="bold",
            color=edge, zorder=3)
    top = y + h - 0.14 - title_size / 72 * 1.45
    for i, line in enumerate(lines):
        ax.text(x + 0.15, top - i * body_size / 72 * 1.42, line, ha="left", va="top", fontsize=body_size,
                color="#222222", zorder=3, family="DejaVu Sans")


def arrow(ax, points, label=None, label_at=None, color="#333333", label_ha="center", style="-|>", width=1.8):
    """A polyline through ``points`` with an arrowhead at the end."""
    for (x0, y0), (x1, y1) in zip(points[:-2], points[1:-1]):
        ax.plot([x0, x1], [y0, y1], color=color, linewidth=width, zorder=4, solid_capstyle="round")
    ax.add_patch(FancyArrowPatch(points[-2], points[-1], arrowstyle=style, mutation_scale=18, color=color,
                                 linewidth=width, zorder=4, shrinkA=0, shrinkB=0))
    if label:
        lx, ly = label_at
        ax.text(lx, ly, label, ha=label_ha, va="center", fontsize=9.5, color=color, zorder=5, style="italic",
                bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.9))


def draw(out: Path) -> Path:
    fig = plt.figure(figsize=(WIDTH, HEIGHT), dpi=DPI)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(0, HEIGHT)
    ax.axis("off")

    # -- top row: prompts -> rollout -> samples -> rewards ------------------------------------------
    box(ax, 0.25, 8.75, 2.6, 1.55, "Prompts", [
        "data.task: synthetic | file",
        "train/data.py, train/tasks.py",
        "(global rank 0)"], kind="data")
    box(ax, 3.25, 7.35, 4.5, 2.95, "Rollout engine", [
        "SGLang servers behind sglang-router",
        "  or the local engine (rollout/local_engine.py;",
        "  its parts in rollout/engine/)",
        "RolloutClient (rollout/client.py): POST /generate",
        "  via the router; routed-expert requests",
        "  straight to the servers (the router drops them)",
        "EngineControl: pause, flush, abort, weight",
        "  updates to every server directly",
        "servers + router: rollout/launch.py"], kind="engine")
    box(ax, 8.15, 7.35, 3.05, 2.95, "Samples", [
        "prompt + response token ids",
        "engine log-probs  log \u03bc",
        "  (logits / T, before top-p/k)",
        "routed experts (R2 / R3)",
        "  [len - 1, layers, top-k]",
        "finish reason",
        "weight version \u2192 policy lag"], kind="data")
    box(ax, 11.6, 7.35, 3.15, 2.95, "Rewards \u2192 advantages", [
        "reward per response",
        "  (synthetic task, or math-verify",
        "  on the last \\boxed{})",
        "GRPO group advantage",
        "  (r - mean) / (std + eps)",
        "  trainer.group_advantages",
        "broadcast to every rank"], kind="data")

    # -- right column: pi_old, micro-batches ------------------------------------------------------
    box(ax, 11.6, 4.55, 3.15, 2.35, "\u03c0_old", [
        "recompute: forward-only Megatron",
        "  pass \u2192 (log-probs, routes)",
        "bypass: \u03c0_old := \u03bc (no pass)",
        "R2: record routes in this pass",
        "R3: replay the engine's routes;",
        "  the routes go to train_step",
        "one scoring step (hook.py); 0.18+:",
        "  from hidden states, chunked"], kind="trainer")
    box(ax, 11.6, 1.95, 3.15, 2.15, "Micro-batches", [
        "N mini-batches (staleness N)",
        "DP partition, THD packing,",
        "CP zigzag slices (batch.py);",
        "a sequence never spans",
        "micro-batches"], kind="data")

    # -- the training step -------------------------------------------------------------------------
    box(ax, 3.55, 1.55, 7.65, 5.35, "N optimizer steps: Megatron-Core forward_backward (all ranks)", [],
        kind="trainer", title_size=12.5)
    box(ax, 3.8, 5.3, 7.15, 0.95, "model forward (mcore/)", [
        "GPTModel chunks under TP \u00b7 PP \u00b7 VPP \u00b7 CP \u00b7 EP \u00b7 ETP (EP all-to-all, PP send/recv)"],
        kind="trainer", inner=True, title_size=11, body_size=9.8)
    box(ax, 3.8, 2.75, 7.15, 2.3, "loss hook: loss_func on the last pipeline stage (hook.py)", [
        "logprobs.py: log \u03c0 at temperature T from vocab-parallel logits  \u2014  1 TP all-gather [tokens, 3]",
        "per-sequence sums: log-ratio, mismatch, tokens  \u2014  1 CP all-reduce [sequences, k]",
        "losses.py + kernel.py: \u03c6(W) = W^k exp(\u03bb(1 - W)) and the baselines;",
        "  TIS / MIS / fold corrections; aggregation",
        "φ and every sequence factor computed identically on each CP rank; loss over local tokens",
        "returns (loss sum, normaliser, metrics)  —  calculate_per_token_loss=True"],
        kind="hook", inner=True, title_size=11, body_size=9.8)
    box(ax, 3.8, 1.7, 7.15, 0.8, "backward \u00b7 finalize_model_grads", [
        "DP\u00d7CP gradient all-reduce, divided by the summed normaliser"],
        kind="trainer", inner=True, title_size=11, body_size=9.8)
    arrow(ax, [(7.375, 5.3), (7.375, 5.05)], color="#b08a00", width=1.4)
    arrow(ax, [(7.375, 2.75), (7.375, 2.5)], color="#b08a00", width=1.4)

    # -- left column: optimizer, weight sync, checkpoints ----------------------------------------------
    box(ax, 0.25, 4.75, 2.85, 3.05, "Weight sync", [
        "convert/export.py export_hf:",
        "  HF-named buckets streamed",
        "  to rank 0",
        "rollout/weight_sync.py:",
        "  pause \u2192 flush \u2192 send",
        "  \u2192 continue",
        "distributed (NCCL broadcast)",
        "  | disk | tensor (CUDA IPC)",
        "  | inprocess (local engine)",
        "calls go to every server directly"], kind="sync")
    box(ax, 0.25, 2.3, 2.85, 2.0, "Optimizer", [
        "Megatron DDP",
        "  (fp32 grad reduce)",
        "Adam, grad clipping,",
        "  LR schedule"], kind="trainer")
    box(ax, 0.25, 0.2, 2.85, 1.7, "Checkpoints", [
        "RUN/checkpoints/step-K",
        "dist_checkpointing: model, Adam,",
        "  RNG, data position, version",
        "run.resume: newest complete"], kind="store")
    box(ax, 3.55, 0.2, 3.6, 1.0, "Metrics", [
        "hook.reduce_metrics \u2192 metrics.jsonl,",
        "  TensorBoard, W&B"], kind="store", title_size=11, body_size=9.5)
    ax.text(7.4, 0.95, "Collectives: TP all-gather (log-probs) \u00b7 CP all-reduce (sequence sums, K/V in attention)\n"
            "DP\u00d7CP all-reduce (gradients, normaliser) \u00b7 PP send/recv (activations) \u00b7 EP all-to-all\n"
            "(tokens to experts) \u00b7 rank 0 \u2192 server GPUs broadcast (weight sync, own NCCL group)",
            ha="left", va="top", fontsize=9.3, color="#444444")

    # -- arrows of the loop --------------------------------------------------------------------------
    arrow(ax, [(2.85, 9.55), (3.25, 9.55)])
    arrow(ax, [(7.75, 8.8), (8.15, 8.8)])
    arrow(ax, [(11.2, 8.8), (11.6, 8.8)])
    arrow(ax, [(13.175, 7.35), (13.175, 6.9)])
    arrow(ax, [(13.175, 4.55), (13.175, 4.1)])
    arrow(ax, [(11.6, 3.0), (11.2, 3.0)])
    arrow(ax, [(3.55, 3.3), (3.1, 3.3)], "step", (3.32, 3.62))
    arrow(ax, [(1.675, 4.3), (1.675, 4.75)], "after N steps", (2.35, 4.52))
    arrow(ax, [(1.675, 7.8), (1.675, 8.3), (3.25, 8.3)], "new weights, version v+1", (2.5, 8.52))
    arrow(ax, [(1.675, 2.3), (1.675, 1.9)], "run.save_every", (2.45, 2.1))
    arrow(ax, [(5.35, 1.55), (5.35, 1.2)], color="#3d7a34")

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor="white")
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Draw the architecture diagram (PNG).")
    parser.add_argument("--out", type=Path, default=OUT, help="PNG path (default: docs/architecture.png)")
    args = parser.parse_args(argv)
    print(f"wrote {draw(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
