"""The layout of a trainer checkpoint ``RUN/checkpoints/step-K``, for readers outside the trainer.

``Policy.save`` writes it: ``mcore/`` (Megatron dist_checkpointing of ``{"model": {"model<chunk>":
...}, "optimizer": ...}``), ``trainer_state.json``, ``scheduler.pt``, ``rng_rank<R>.pt`` and, last,
the ``complete`` marker. The run's resolved ``config.yaml`` sits in ``RUN``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from megatron_vespo.train.config import load_config

CHECKPOINT_PREFIX = "step-"  # RUN/checkpoints/step-<optimizer step>
MCORE_DIR = "mcore"
STATE_FILE = "trainer_state.json"
COMPLETE_MARKER = "complete"
# the model alone, without the optimizer; chunk 0: virtual pipeline chunks hold different layers
MODEL_STATE_PATH = ("model", "model0")


class ModelCheckpoint(NamedTuple):
    directory: str  # the dist_checkpointing directory
    state_path: tuple[str, ...]  # keys of the model's state in it
    base_model: str  # the Hugging Face model the run started from: its architecture and side files


def is_trainer_checkpoint(ckpt: str) -> bool:
    return os.path.exists(os.path.join(ckpt, STATE_FILE)) and os.path.isdir(os.path.join(ckpt, MCORE_DIR))


def model_checkpoint(ckpt: str, base_model: str | None = None) -> ModelCheckpoint | None:
    """Where the model of trainer checkpoint ``ckpt`` is, or None when ``ckpt`` is not one. Its
    architecture is the run's (``config.yaml``'s ``model.hf_dir``) unless ``base_model`` is given."""
    if not is_trainer_checkpoint(ckpt):
        return None
    if base_model is None:
        run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "config.yaml")
        if not os.path.exists(run_config):
            raise FileNotFoundError(f"{ckpt} is a trainer checkpoint but its run's config.yaml ({run_config}) is "
                                    f"missing: pass --base-model (the Hugging Face model the run started from)")
        base_model = load_config(run_config).model.hf_dir
    if not os.path.isfile(os.path.join(ckpt, COMPLETE_MARKER)):
        raise ValueError(f"{ckpt} has no '{COMPLETE_MARKER}' marker: the trainer was stopped while writing it")
    return ModelCheckpoint(os.path.join(ckpt, MCORE_DIR), MODEL_STATE_PATH, base_model)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint under run_dir/checkpoints (an interrupted save is ignored)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    done = [d for d in os.listdir(root) if d.startswith(CHECKPOINT_PREFIX)
            and os.path.exists(os.path.join(root, d, COMPLETE_MARKER))]
    if not done:
        return None
    return os.path.join(root, max(done, key=lambda d: int(d[len(CHECKPOINT_PREFIX):])))
