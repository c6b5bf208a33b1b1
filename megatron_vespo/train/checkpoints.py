"""The layout of a trainer checkpoint ``RUN/checkpoints/step-K``, for readers outside the trainer.

``Policy.save`` writes it: ``mcore/`` (Megatron dist_checkpointing of ``{"model": {"model<chunk>":
...}, "optimizer": ...}``), ``trainer_state.json``, ``scheduler.json``, ``rng_rank<R>.pt`` and, last,
the ``complete`` marker. The run's resolved ``config.yaml`` sits in ``RUN``.

Nothing read from a checkpoint can run code: the side files are JSON or tensors and plain data
(``torch.load(weights_only=True)``), and the dist-checkpoint's ``.metadata`` pickle, which torch
itself unpickles without restriction, is first read here with only its metadata classes allowed.
Checkpoints of earlier releases (``scheduler.pt``; RNG states holding numpy arrays) load as plain
data too, with a note. A file that cannot be read raises :class:`CheckpointUnreadable` naming it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from typing import NamedTuple

import numpy as np
import torch

from megatron_vespo.train.config import load_config

CHECKPOINT_PREFIX = "step-"  # RUN/checkpoints/step-<optimizer step>
MCORE_DIR = "mcore"
STATE_FILE = "trainer_state.json"
COMPLETE_MARKER = "complete"
SCHEDULER_FILE = "scheduler.json"
LEGACY_SCHEDULER_FILE = "scheduler.pt"  # releases before: a torch.save pickle of the same dict
TRAINER_STATE_KEYS = ("step", "batch_index", "data_pos", "version")
DCP_METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's index of the shards
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


class CheckpointUnreadable(Exception):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong with it."""


def complete_checkpoints(run_dir: str) -> list[str]:
    """The complete checkpoints under run_dir/checkpoints, newest first (an interrupted save,
    without its ``complete`` marker, is not one)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    done = [d for d in os.listdir(root) if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit()
            and os.path.exists(os.path.join(root, d, COMPLETE_MARKER))]
    done.sort(key=lambda d: int(d[len(CHECKPOINT_PREFIX):]), reverse=True)
    return [os.path.join(root, d) for d in done]


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint under run_dir/checkpoints, or None."""
    found = complete_checkpoints(run_dir)
    return found[0] if found else None


def rng_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rng_rank{rank}.pt")


# -- the trainer's state ------------------------------------------------------------------------------

def write_trainer_state(directory: str, state: dict) -> None:
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)


def read_trainer_state(directory: str) -> dict:
    path = os.path.join(directory, STATE_FILE)
    state = _read_json(path)
    missing = [k for k in TRAINER_STATE_KEYS if not isinstance(state.get(k), int) or isinstance(state.get(k), bool)]
    if missing:
        raise CheckpointUnreadable(f"{path}: {', '.join(missing)} missing or not an integer")
    return state


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise CheckpointUnreadable(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointUnreadable(f"{path} is not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointUnreadable(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


# -- the learning-rate schedule ------------------------------------------------------------------------

def write_scheduler(directory: str, state: dict) -> None:
    with open(os.path.join(directory, SCHEDULER_FILE), "w") as f:
        json.dump(state, f, indent=1)


def read_scheduler(directory: str, note=None) -> dict:
    """Megatron's OptimizerParamScheduler state (numbers and strings); ``note(message)`` hears of
    a checkpoint in the earlier form."""
    path = os.path.join(directory, SCHEDULER_FILE)
    if os.path.exists(path) or not os.path.exists(os.path.join(directory, LEGACY_SCHEDULER_FILE)):
        return _read_json(path)
    legacy = os.path.join(directory, LEGACY_SCHEDULER_FILE)
    state = _load_plain(legacy)
    if not isinstance(state, dict) or not all(isinstance(v, (int, float, str, bool, type(None)))
                                              for v in state.values()):
        raise CheckpointUnreadable(f"{legacy} is not a learning-rate schedule's state (a dict of numbers)")
    if note is not None:
        note(f"{legacy} is in the earlier form (a pickle); read as plain data. New checkpoints write {SCHEDULER_FILE}")
    return state


# -- random number generators --------------------------------------------------------------------------

def write_rng(path: str, tracker_states: dict) -> None:
    """This process's Python, numpy and torch RNG states and Megatron's tracker states, as tensors
    and plain data (what ``torch.load(weights_only=True)`` reads)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    torch.save({
        "format": 2,
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda_tracker": dict(tracker_states),
    }, path)


def read_rng(path: str, note=None) -> dict:
    """{"python": state for random.setstate, "numpy": for np.random.set_state, "torch": a ByteTensor,
    "cuda_tracker": Megatron's tracker states} from :func:`write_rng`'s file or an earlier one."""
    saved = _load_plain(path, allow_numpy_arrays=True)
    if not isinstance(saved, dict) or not {"python", "numpy", "torch", "cuda_tracker"} <= set(saved):
        raise CheckpointUnreadable(f"{path} is not an RNG state file (python, numpy, torch, cuda_tracker)")
    if saved.get("format") == 2:
        py, npy = saved["python"], saved["numpy"]
        try:
            return {"python": (py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]),
                    "numpy": (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                              npy["cached_gaussian"]),
                    "torch": saved["torch"], "cuda_tracker": saved["cuda_tracker"]}
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise CheckpointUnreadable(f"{path}: malformed RNG state ({err!r})") from None
    if note is not None:
        note(f"{path} is in the earlier form (numpy arrays in a pickle); read as plain data")
    return saved


_NUMPY_ARRAY_GLOBALS = {"numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                        "numpy.core.multiarray._reconstruct"}


def _load_plain(path: str, allow_numpy_arrays: bool = False):
    """``torch.load(weights_only=True)``: tensors and plain data only (earlier RNG files also hold
    numpy arrays, whose rebuilding is allowed then and nothing else)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointUnreadable(f"{path} is missing") from None
    except pickle.UnpicklingError as err:
        if not allow_numpy_arrays:
            raise CheckpointUnreadable(f"{path} holds more than tensors and plain data: not loaded (unpickling "
                                       f"it could run code): {str(err).splitlines()[-1][:300]}") from None
    except Exception as err:  # truncated, not a torch file, ...
        raise CheckpointUnreadable(f"{path} is not readable ({type(err).__name__}: {err})") from None
    try:
        names = set(get_unsafe_globals_in_checkpoint(path))
    except Exception as err:
        raise CheckpointUnreadable(f"{path} is not readable ({type(err).__name__}: {err})") from None
    if not names <= _NUMPY_ARRAY_GLOBALS:
        raise CheckpointUnreadable(f"{path} refers to {sorted(names - _NUMPY_ARRAY_GLOBALS)}: not loaded "
                                   "(unpickling it could run code)")
    allowed = [_resolve(name) for name in names] + [type(np.dtype(np.uint32))]
    try:
        with safe_globals([a for a in allowed if a is not None]):
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:
        raise CheckpointUnreadable(f"{path} is not readable ({type(err).__name__}: {err})") from None


def _resolve(dotted: str):
    import importlib

    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


# -- the distributed checkpoint's index ----------------------------------------------------------------

class _MetadataUnpickler(pickle.Unpickler):
    """Only what torch.distributed.checkpoint writes into its .metadata: its own classes, torch
    dtypes, torch.Size, the layout lookup and a path. Anything else (a function to call) is refused."""

    def find_class(self, module, name):
        if not (module.startswith("torch.distributed.checkpoint.") or module in ("torch", "torch.serialization",
                                                                                "collections", "pathlib")):
            raise CheckpointUnreadable(f"refers to {module}.{name}")  # refused before anything is imported
        value = super().find_class(module, name)
        if module.startswith("torch.distributed.checkpoint.") and isinstance(value, type):
            return value
        if module == "torch" and (isinstance(value, torch.dtype) or value is torch.Size):
            return value
        if (module, name) in {("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}:  # the checkpoint id
            return value
        raise CheckpointUnreadable(f"refers to {module}.{name}")


def check_dist_checkpoint(mcore_dir: str) -> None:
    """Before Megatron reads ``mcore_dir``: its shard index holds only checkpoint metadata (torch
    unpickles it unrestricted), and every shard file it names is there, whole."""
    path = os.path.join(mcore_dir, DCP_METADATA_FILE)
    if not os.path.exists(path):
        raise CheckpointUnreadable(f"{path} is missing: {mcore_dir} is not a complete distributed checkpoint")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except CheckpointUnreadable as err:
        raise CheckpointUnreadable(f"{path} {err}: not loaded (unpickling it could run code)") from None
    except Exception as err:
        raise CheckpointUnreadable(f"{path} is not readable ({type(err).__name__}: {err})") from None
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        relative = getattr(info, "relative_path", None)
        if relative is None:
            continue
        needed[relative] = max(needed.get(relative, 0), int(info.offset) + int(info.length))
    for relative, size in sorted(needed.items()):
        shard = os.path.join(mcore_dir, relative)
        if not os.path.isfile(shard):
            raise CheckpointUnreadable(f"{shard} is missing (named by {path})")
        if os.path.getsize(shard) < size:
            raise CheckpointUnreadable(f"{shard} is truncated: {os.path.getsize(shard)} bytes, {path} needs {size}")
