"""A trainer checkpoint's files (megatron_vespo/train/checkpoints.py): what is written reads back
exactly, earlier forms still load, and nothing in a checkpoint can run code or fail without naming
the file. The trainer's fallback to the previous checkpoint is in tests/test_trainer.py."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from megatron_vespo.train import checkpoints
from megatron_vespo.train.checkpoints import CheckpointUnreadable


class Payload:
    """Unpickling it creates a directory: the proof that a file ran code when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_states_read_back_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian in numpy's state
    path = tmp_path / "rng_rank0.pt"
    tracker = torch.Generator().manual_seed(4).get_state()
    checkpoints.write_rng(str(path), {"model-parallel-rng": tracker})
    expected = _draws()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    notes = []
    rng = checkpoints.read_rng(str(path), note=notes.append)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    assert _draws() == expected and not notes
    assert torch.equal(rng["cuda_tracker"]["model-parallel-rng"], tracker)
    torch.load(path, weights_only=True)  # plain data: the strict loader reads it as is


def test_an_earlier_rng_file_loads_as_plain_data_with_a_note(tmp_path):
    random.seed(5)
    np.random.seed(6)
    path = tmp_path / "rng_rank0.pt"
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda_tracker": {}}, path)  # the form releases before this one wrote
    expected = _draws()
    random.seed(0)
    np.random.seed(0)
    notes = []
    rng = checkpoints.read_rng(str(path), note=notes.append)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    assert _draws()[:2] == expected[:2]
    assert len(notes) == 1 and "earlier form" in notes[0] and str(path) in notes[0]


@pytest.mark.parametrize("which", ["rng", "legacy scheduler"])
def test_a_side_file_that_would_run_code_is_refused_by_name(tmp_path, which):
    marker = tmp_path / "ran"
    if which == "rng":
        path = tmp_path / "rng_rank0.pt"
        torch.save({"python": Payload(marker), "numpy": None, "torch": None, "cuda_tracker": {}}, path)
        read = lambda: checkpoints.read_rng(str(path))  # noqa: E731
    else:
        path = tmp_path / "scheduler.pt"
        torch.save({"num_steps": 3, "max_lr": Payload(marker)}, path)
        read = lambda: checkpoints.read_scheduler(str(tmp_path))  # noqa: E731
    with pytest.raises(CheckpointUnreadable, match=str(path)) as err:
        read()
    assert "could run code" in str(err.value)
    assert not marker.exists()


def test_the_schedule_reads_back_and_an_earlier_pickle_of_numbers_still_loads(tmp_path):
    state = {"max_lr": 1e-6, "num_steps": 12, "lr_decay_style": "constant", "lr_warmup_steps": 0}
    checkpoints.write_scheduler(str(tmp_path), state)
    assert checkpoints.read_scheduler(str(tmp_path)) == state
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(state, legacy / "scheduler.pt")
    notes = []
    assert checkpoints.read_scheduler(str(legacy), note=notes.append) == state
    assert "earlier form" in notes[0]


@pytest.mark.parametrize("content,message", [
    ("", "is not readable JSON"),
    ("[1, 2]", "holds a JSON list"),
    ('{"step": 4, "batch_index": 2, "data_pos": 8}', "version missing or not an integer"),
    ('{"step": "4", "batch_index": 2, "data_pos": 8, "version": 2}', "step missing or not an integer"),
])
def test_a_broken_trainer_state_names_the_file(tmp_path, content, message):
    (tmp_path / "trainer_state.json").write_text(content)
    with pytest.raises(CheckpointUnreadable, match=message) as err:
        checkpoints.read_trainer_state(str(tmp_path))
    assert str(tmp_path / "trainer_state.json") in str(err.value)


def test_complete_checkpoints_newest_first(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step-2", True), ("step-10", True), ("step-4", False), ("step-6.partial", True),
                           ("step-x", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "complete").write_text("ok\n")
    assert checkpoints.complete_checkpoints(str(tmp_path)) == [str(root / "step-10"), str(root / "step-2")]
    assert checkpoints.latest_checkpoint(str(tmp_path)) == str(root / "step-10")
    assert checkpoints.latest_checkpoint(str(tmp_path / "elsewhere")) is None


@pytest.fixture
def dist_checkpoint(tmp_path):
    """A real torch.distributed.checkpoint directory (what Megatron's torch_dist strategy writes)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    directory = tmp_path / "mcore"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process": it is
        dcp.save({"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(3)}, checkpoint_id=str(directory),
                 no_dist=True)
    return directory


def test_a_dist_checkpoint_is_checked_before_megatron_reads_it(dist_checkpoint):
    checkpoints.check_dist_checkpoint(str(dist_checkpoint))  # whole: nothing to say
    shard = next(p for p in dist_checkpoint.iterdir() if p.suffix == ".distcp")
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CheckpointUnreadable, match=f"{shard} is truncated"):
        checkpoints.check_dist_checkpoint(str(dist_checkpoint))
    shard.unlink()
    with pytest.raises(CheckpointUnreadable, match=f"{shard} is missing"):
        checkpoints.check_dist_checkpoint(str(dist_checkpoint))


def test_a_shard_index_that_would_run_code_is_refused(dist_checkpoint, tmp_path):
    marker = tmp_path / "ran"
    with open(dist_checkpoint / ".metadata", "wb") as f:
        pickle.dump({"storage_data": Payload(marker)}, f)
    with pytest.raises(CheckpointUnreadable, match="could run code") as err:
        checkpoints.check_dist_checkpoint(str(dist_checkpoint))
    assert str(dist_checkpoint / ".metadata") in str(err.value) and "posix.mkdir" in str(err.value)
    assert not marker.exists()
