"""What differs between the Megatron-Core releases the project supports (0.16.1 to 0.19.x), in one
place. Each difference names the Megatron file it concerns; tests/test_mcore_versions.py checks
each one on the installed release, and the compatibility leg of ``make test`` runs them on the
other end of the range.

* Triton at import (``pipeline_parallel/schedules.py``, 0.18+): schedules imports
  ``transformer/moe/paged_stash.py``, whose kernels (``moe/ops/paged_stash.py``) ``import triton``
  unconditionally; so do ``models/gpt/gpt_model.py`` and ``transformer/moe/experts.py``.
* Route order (``transformer/moe/moe_utils.py``, 0.18+): top-k routing calls
  ``torch.topk(..., sorted=torch.is_grad_enabled())``: routes chosen under no_grad (a pi_old pass
  recording R2 routes) come back in no particular order; 0.16-0.17 sort them by score. Replay is
  order-insensitive (scores are gathered, the routing map scattered); the routes the project
  records are made canonical (ascending expert id) so that both releases give the same data.
* Aux-loss scaling (``transformer/moe/router.py``, 0.19+): with ``calculate_per_token_loss`` the
  load-balancing and z-loss gradients are multiplied by tp x cp (the router weight sees
  tp x cp times fewer tokens per rank than the loss normalises by); 0.16-0.18 leave the factor out,
  so with TP or CP > 1 their aux-loss gradient is tp x cp times smaller. The project's default
  ``moe_aux_loss_coeff`` is 0 (the paper's recipe), where the two agree.
* Checkpoint direction (``dist_checkpointing/serialization.py``, 0.19+): the common state is saved
  inside the shards instead of ``common.pt``. 0.19 reads both; 0.16-0.18 cannot read 0.19's and
  fail with an AttributeError naming no file, hence :func:`check_checkpoint_readable`.
* ``output_processor`` (``models/gpt/gpt_model.py``, 0.18+): ``GPTModel.forward`` hands the last
  hidden states and the output layer to a caller's function instead of forming the logits; the
  scoring passes use it to compute log-probs a chunk of response rows at a time
  (``hook.make_scoring_step``). Before 0.18 they take the logits of the whole micro-batch.
* ``RouterReplay.layer_number`` (``transformer/moe/router_replay.py``, 0.19+): each router's
  replay knows its global 1-based layer (PP/VPP offset included); before, only the
  ``TransformerLayer`` does.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from packaging.version import Version

from megatron_vespo.input_files import read_json_object

SUPPORTED = ">=0.16.1,<0.20"  # as setup.py declares


@functools.lru_cache(maxsize=None)
def mcore_version() -> Version:
    """The installed Megatron-Core release (local build tags such as +a93c877 dropped)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("megatron-core")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH
        import megatron.core

        text = megatron.core.__version__
    return Version(Version(text).base_version)


def at_least(release: str) -> bool:
    return mcore_version() >= Version(release)


def check_supported() -> None:
    from packaging.specifiers import SpecifierSet

    if mcore_version() not in SpecifierSet(SUPPORTED):
        raise RuntimeError(f"megatron-core {mcore_version()} is installed; megatron_vespo supports {SUPPORTED}")


# -- pipeline_parallel/schedules.py (0.18+): Triton at import -------------------------------------

def triton_needed_at_import() -> bool:
    return at_least("0.18")


def check_triton_importable() -> None:
    """Name the cause before ``import megatron.core.pipeline_parallel`` fails deep inside Megatron."""
    try:
        found = importlib.util.find_spec("triton") is not None
    except ImportError:  # a finder that refuses it
        found = False
    if triton_needed_at_import() and not found:
        raise ImportError(
            f"megatron-core {mcore_version()} imports Triton when its pipeline schedules load "
            "(megatron/core/pipeline_parallel/schedules.py -> transformer/moe/paged_stash.py -> "
            "moe/ops/paged_stash.py: `import triton`), on CPUs too: pip install triton")


# -- transformer/moe/moe_utils.py (0.18+): route order ----------------------------------------------

def routes_sorted_under_no_grad() -> bool:
    """Whether top-k routes chosen under no_grad come back sorted by score."""
    return not at_least("0.18")


def canonical_routes(indices):
    """Top-k expert ids per token in ascending order: the same data from every release."""
    return indices.sort(dim=-1).values


# -- transformer/moe/router.py (0.19+): aux-loss scaling under per-token loss -------------------------

def aux_loss_gradient_factor(tp_size: int, cp_size: int) -> int:
    """What Megatron multiplies the load-balancing and z-loss gradients by with per-token loss."""
    return tp_size * cp_size if at_least("0.19") else 1


# -- dist_checkpointing/serialization.py (0.19+): the common state inside the shards -------------------

LEGACY_COMMON_FILE = "common.pt"


def checkpoint_writer(directory: str) -> str:
    """``"0.19+"`` when the checkpoint keeps its common state in the shards (no common.pt, and no
    ``common_backend`` in metadata.json), ``"0.16-0.18"`` when it has common.pt."""
    if os.path.exists(os.path.join(directory, LEGACY_COMMON_FILE)):
        return "0.16-0.18"
    metadata = os.path.join(directory, "metadata.json")
    if not os.path.exists(metadata):
        raise FileNotFoundError(f"{directory} is not a Megatron distributed checkpoint: it has no metadata.json")
    config = read_json_object(metadata, "checkpoint metadata")
    if "common_backend" in config:
        raise FileNotFoundError(f"{directory} is incomplete: metadata.json names a common backend but "
                                f"{LEGACY_COMMON_FILE} is missing")
    return "0.19+"


def check_checkpoint_readable(directory: str) -> None:
    """A clear error where an older Megatron-Core is asked to load a newer checkpoint."""
    if checkpoint_writer(directory) == "0.19+" and not at_least("0.19"):
        raise RuntimeError(
            f"{directory} was written by megatron-core 0.19 or newer (its common state is inside the shards, "
            f"there is no {LEGACY_COMMON_FILE}); the installed megatron-core {mcore_version()} cannot read it. "
            "Load it with megatron-core >= 0.19 (Python >= 3.12), or convert it there to Hugging Face "
            "(megatron-vespo convert mcore-to-hf) and start from that")


# -- models/gpt/gpt_model.py (0.18+): output_processor -------------------------------------------------

def has_output_processor() -> bool:
    """Whether ``GPTModel.forward`` takes ``output_processor`` (and ``output_processor_context``)."""
    return at_least("0.18")


# -- transformer/moe/router_replay.py (0.19+): RouterReplay.layer_number --------------------------------

def replay_layer_number(router) -> int | None:
    """The global 1-based layer of a router as its RouterReplay knows it (0.19+), else None."""
    replay = getattr(router, "router_replay", None)
    return getattr(replay, "layer_number", None) if at_least("0.19") else None
