"""megatron_vespo/mcore/versions.py against the installed Megatron-Core: each difference it names
holds for this release (make test runs this file on 0.19.x and on 0.16.1), and checkpoints cross
releases in the direction that works and fail clearly in the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_vespo.mcore import versions
from tests.conftest import ROOT, _env, torchrun

OTHER_PYTHON_ENV = "MEGATRON_VESPO_OTHER_MCORE_PYTHON"  # the other leg's interpreter (set by make test)


def test_the_installed_release_is_supported_and_setup_py_declares_the_same_range():
    versions.check_supported()
    setup = (ROOT / "setup.py").read_text()
    assert f'"megatron-core{versions.SUPPORTED}"' in setup


BLOCK_TRITON = """
import sys
class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton' (blocked by the test)", name="triton")
        return None
sys.meta_path.insert(0, _NoTriton())
"""


@pytest.mark.slow
def test_triton_at_import_as_versions_says():
    """pipeline_parallel/schedules.py: whether importing Megatron's schedules needs Triton."""
    code = BLOCK_TRITON + """
try:
    import megatron.core.pipeline_parallel  # noqa: F401
    print("IMPORTED")
except ModuleNotFoundError as err:
    print("NEEDS", err.name)
from megatron_vespo.mcore import versions
try:
    versions.check_triton_importable()
    print("CHECK_OK")
except ImportError as err:
    print("CHECK_ERROR", err)
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if versions.triton_needed_at_import():
        assert "NEEDS triton" in proc.stdout
        assert "CHECK_ERROR" in proc.stdout and "schedules.py" in proc.stdout and "pip install triton" in proc.stdout
    else:
        assert "IMPORTED" in proc.stdout and "CHECK_OK" in proc.stdout


def test_route_order_under_no_grad_as_versions_says(monkeypatch):
    """transformer/moe/moe_utils.py: whether top-k routing asks torch.topk for sorted routes."""
    from megatron.core.transformer.moe import moe_utils

    calls = []
    real = torch.topk

    def spy(*args, **kwargs):
        calls.append(kwargs.get("sorted", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "topk", spy)
    logits = torch.randn(16, 8)
    with torch.no_grad():
        moe_utils.topk_routing_with_score_function(logits, 2, use_pre_softmax=False, score_function="softmax")
    assert calls and all(c == versions.routes_sorted_under_no_grad() for c in calls)
    calls.clear()
    moe_utils.topk_routing_with_score_function(logits, 2, use_pre_softmax=False, score_function="softmax")
    assert calls and all(calls)  # with gradients: sorted in every release


def test_canonical_routes_are_ascending_expert_ids():
    routes = torch.tensor([[[5, 1, 3], [0, 7, 2]]])
    assert versions.canonical_routes(routes).tolist() == [[[1, 3, 5], [0, 2, 7]]]


@pytest.mark.slow
def test_aux_loss_gradient_factor_as_versions_says(tmp_path):
    """transformer/moe/router.py: the router weights' load-balancing gradient at tp2 over tp1 (the
    same tokens, the hook's per-token loss, every advantage 0 so the policy loss adds nothing) is
    the factor versions names divided by tp: 1 on 0.19+, 1/2 before."""
    def router_grads(nproc, layout, coeff="0.01"):
        out = tmp_path / f"{layout}-{coeff}.pt"
        torchrun("aux_loss.py", nproc, "--layout", layout, "--out", str(out), "--coeff", coeff)
        return torch.load(out, weights_only=True)

    alone, tp2 = router_grads(1, "single"), router_grads(2, "tp2")
    assert alone.keys() == tp2.keys() and len(alone) == 3  # the tiny model's three MoE layers
    expected = versions.aux_loss_gradient_factor(2, 1) / 2
    for name in alone:
        assert alone[name].norm() > 1e-4, name
        torch.testing.assert_close(tp2[name], alone[name] * expected, rtol=1e-4, atol=1e-8)
    # without the aux loss the routers get nothing: the gradients above are the aux loss's alone
    assert all(g.abs().max() == 0 for g in router_grads(1, "single", "0").values())
    assert versions.aux_loss_gradient_factor(1, 1) == 1


def test_output_processor_as_versions_says():
    """models/gpt/gpt_model.py: whether GPTModel.forward takes an output_processor."""
    import inspect

    from megatron.core.models.gpt import GPTModel

    parameters = inspect.signature(GPTModel.forward).parameters
    assert versions.has_output_processor() == ("output_processor" in parameters)
    assert versions.has_output_processor() == ("output_processor_context" in parameters)


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ("--layout", "tp2", "--temperature", "0.7"),  # sequence parallelism: the hidden states gathered
    ("--layout", "pp2", "--tied", "--format", "padded"),  # the tied output weight on the last stage
    ("--layout", "cp2"),
], ids=lambda a: " ".join(a[1:]))
def test_scoring_from_hidden_states_equals_the_logits_path(args):
    """The scoring step's log-probs through output_processor (0.18+) equal those from the logits,
    and both the fp64 reference; an older release refuses the path by name."""
    proc = torchrun("scoring_paths.py", 2, *args)
    report = json.loads(proc.stdout.split("SCORING_OK", 1)[1].strip().splitlines()[0])
    assert report["logits_vs_fp64"] < 1e-5
    if versions.has_output_processor():
        assert report["paths"] == ["hidden", "logits"]
        assert report["hidden_vs_fp64"] < 1e-5 and report["hidden_vs_logits"] < 1e-6
        assert report["hidden_sp_gathers"] == (2 if "tp2" in args else 0)  # one per micro-batch
    else:
        assert report["paths"] == ["logits"]


SAVE = """
import sys
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel
initialize_model_parallel(Layout())
weight = torch.arange(12, dtype=torch.float32).view(3, 4)
import os
os.makedirs(sys.argv[1])
dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", weight, replica_id=0), "step": 7}, sys.argv[1])
print("SAVED")
"""

LOAD = """
import sys
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron_vespo.mcore import versions
from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel
initialize_model_parallel(Layout())
try:
    versions.check_checkpoint_readable(sys.argv[1])
except RuntimeError as err:
    print("REFUSED", err)
    sys.exit(0)
state = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(3, 4), replica_id=0)}, sys.argv[1])
assert torch.equal(state["w"], torch.arange(12, dtype=torch.float32).view(3, 4)) and state["step"] == 7
print("LOADED", versions.mcore_version())
"""


def _run(python: str, code: str, *args: str) -> str:
    proc = subprocess.run([python, "-c", code, *args], env=_env(), capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_checkpoint_format_of_this_release_and_the_refusal_of_a_newer_one(tmp_path):
    """dist_checkpointing/serialization.py: 0.19 keeps the common state in the shards."""
    directory = tmp_path / "ckpt"
    assert "SAVED" in _run(sys.executable, SAVE, str(directory))
    writer = versions.checkpoint_writer(str(directory))
    assert writer == ("0.19+" if versions.at_least("0.19") else "0.16-0.18")
    assert "LOADED" in _run(sys.executable, LOAD, str(directory))
    # a checkpoint as 0.19 writes it, seen by whichever release is installed
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    if versions.at_least("0.19"):
        versions.check_checkpoint_readable(str(newer))
    else:
        with pytest.raises(RuntimeError, match="written by megatron-core 0.19 or newer.*cannot read it"):
            versions.check_checkpoint_readable(str(newer))
    with pytest.raises(FileNotFoundError, match="no metadata.json"):
        versions.checkpoint_writer(str(tmp_path))


@pytest.mark.slow
def test_checkpoints_cross_releases(tmp_path):
    """With the other leg's interpreter (make test sets it): a 0.16.1 checkpoint loads on 0.19, a
    0.19 checkpoint is refused by 0.16.1 with a clear error, whichever side runs this test."""
    other = os.environ.get(OTHER_PYTHON_ENV)
    if not other:
        if os.environ.get("MEGATRON_VESPO_REQUIRE_OTHER_MCORE") == "1":
            pytest.fail(f"{OTHER_PYTHON_ENV} is not set")
        pytest.skip(f"{OTHER_PYTHON_ENV} names no interpreter of the other Megatron-Core release (make test sets it)")
    other_version = _run(other, "import megatron.core; print(megatron.core.__version__)").strip()
    assert (versions.mcore_version() >= versions.Version("0.19")) != (other_version >= "0.19")
    newer, older = (sys.executable, other) if versions.at_least("0.19") else (other, sys.executable)
    old_ckpt, new_ckpt = tmp_path / "from-0.16", tmp_path / "from-0.19"
    _run(older, SAVE, str(old_ckpt))
    _run(newer, SAVE, str(new_ckpt))
    assert "LOADED 0.19" in _run(newer, LOAD, str(old_ckpt))
    refused = _run(older, LOAD, str(new_ckpt))
    assert "REFUSED" in refused and "written by megatron-core 0.19 or newer" in refused
