"""Megatron-Core 0.16.1 on CPU: every patch of megatron_vespo.mcore.cpu, the builder's rules, and
real multi-process training + dist_checkpointing on gloo."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_vespo.mcore import cpu
from megatron_vespo.mcore.model import MoEModelConfig, transformer_config
from megatron_vespo.mcore.parallel import Layout
from tests.conftest import ROOT, _env, torchrun

cpu.apply_cpu_patches()


def test_all_patches_applied_once():
    names = cpu.apply_cpu_patches()
    assert names == cpu.applied_patches()
    assert set(names) == set(cpu._PATCHES) | {"cuda_to_cpu_mode"}


@pytest.mark.slow
def test_patches_not_applied_when_cuda_is_present():
    code = ("import torch; torch.cuda.is_available = lambda: True\n"
            "from megatron_vespo.mcore import cpu\n"
            "assert cpu.apply_cpu_patches() == [], 'patched on a GPU machine'\n"
            "assert torch.cuda.current_device is not None and cpu.applied_patches() == []\n"
            "print('NO_PATCH_OK')")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert "NO_PATCH_OK" in out.stdout, out.stderr


def test_cuda_to_cpu_mode():
    t = torch.zeros(3, device="cuda")
    assert t.device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert t.cuda() is t and t.to("cuda").device.type == "cpu"
    assert t.type() == "torch.cuda.FloatTensor" and t.bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert t.type(torch.float64).dtype == torch.float64  # conversion still works
    assert torch.cuda.current_device() == "cpu"


def test_streams_and_events_are_noops():
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        event = stream.record_event()
    event.synchronize()
    torch.cuda.synchronize()
    torch.zeros(1).record_stream(stream)


def test_rng_tracker_keeps_isolated_cpu_states():
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("a", 11)
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer_before)  # the default stream is untouched
    with tracker.fork("a"):
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the tracked stream advanced
    assert torch.equal(first, torch.rand(3, generator=torch.Generator().manual_seed(11)))
    with pytest.raises(Exception, match="is not added"):
        with tracker.fork("missing"):
            pass
    assert isinstance(tracker, mrandom.CudaRNGStatesTracker)
    assert tensor_parallel.get_cuda_rng_tracker() is tracker


def test_router_gating_linear_without_transformer_engine():
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    x, w = torch.randn(5, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    out = router_gating_linear(x, w, None, torch.float32)
    torch.testing.assert_close(out, x @ w.T)
    out.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_split_sizes_become_numpy():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    sizes = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert isinstance(sizes, np.ndarray) and sizes.tolist() == [3, 1]
    assert token_dispatcher.maybe_move_tensor_to_cpu is moe_utils.maybe_move_tensor_to_cpu
    t = torch.tensor([1])
    assert moe_utils.maybe_move_tensor_to_cpu(t) is t


def test_torch_norm_accepts_sequence_parallel_and_tags_params():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = transformer_config(MoEModelConfig(), Layout(tp=2))
    norm = WrappedTorchNorm(config, 64, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(p.sequence_parallel for p in norm.parameters())
    x = torch.randn(3, 64)
    torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


@pytest.mark.slow
def test_uneven_all_gather_and_model_layouts_on_gloo():
    proc = torchrun("uneven_gather.py", 2)
    assert "UNEVEN_GATHER_OK" in proc.stdout


def test_builder_rules_and_errors():
    m = MoEModelConfig()
    config = transformer_config(m, Layout(tp=2, ep=2))
    assert config.sequence_parallel and not config.add_bias_linear
    assert config.moe_aux_loss_coeff == 0 and config.moe_router_load_balancing_type == "none"
    assert config.calculate_per_token_loss
    with pytest.raises(ValueError, match="add_bias_linear=True is not supported with MoE"):
        transformer_config(m, Layout(), add_bias_linear=True)
    with pytest.raises(ValueError, match="sequence_parallel=False contradicts tp=2"):
        transformer_config(m, Layout(tp=2), sequence_parallel=False)
    with pytest.raises(ValueError, match="unknown TransformerConfig settings"):
        transformer_config(m, Layout(), not_a_setting=1)
    with pytest.raises(ValueError, match="num_query_groups = 2 is not divisible by tp = 4"):
        transformer_config(m, Layout(tp=4))
    with pytest.raises(ValueError, match="num_experts = 8 is not divisible by ep = 3"):
        transformer_config(m, Layout(ep=3, dp=3))
    with pytest.raises(ValueError, match="num_layers = 4 is not divisible by pp \\* vpp = 3"):
        transformer_config(m, Layout(pp=3))
    aux = transformer_config(MoEModelConfig(moe_aux_loss_coeff=1e-3), Layout())
    assert aux.moe_router_load_balancing_type == "aux_loss"


def test_layout_parsing():
    assert Layout.parse("tp2pp2ep2").world_size == 8
    assert Layout.parse("ep2").world_size == 2 and Layout.parse("ep2").data_parallel == 2
    assert Layout.parse("tp2ep2").world_size == 4  # expert TP defaults to TP
    assert Layout.parse("tp2ep2etp1").world_size == 2
    assert Layout.parse("single").world_size == 1
    assert Layout.parse("pp2vpp2").world_size == 2 and Layout.parse("pp2vpp2").vpp == 2
    with pytest.raises(ValueError, match="virtual pipeline \\(vpp = 2\\) needs pp > 1"):
        Layout.parse("vpp2").validate()
    with pytest.raises(ValueError, match="cannot parse layout"):
        Layout.parse("tp2xx3")
    with pytest.raises(ValueError, match="names tp twice"):
        Layout.parse("tp2tp2")
    with pytest.raises(ValueError, match="needs world size 4, but 3 processes run"):
        Layout.parse("tp2dp2").validate(3)
    with pytest.raises(ValueError, match="must divide"):
        Layout.parse("ep4dp2").validate()


def test_every_command_takes_data_parallelism_from_the_world_size(monkeypatch):
    """The trainer, check_config.py and the convert/score/mismatch commands derive dp from the
    processes that run (the paper's 32-GPU layout: 4 data-parallel replicas of tp2 x pp2)."""
    import argparse

    from megatron_vespo.launcher import layout_from_args

    args = argparse.Namespace(tp=2, pp=2, vpp=1, cp=1, ep=8, etp=1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert layout_from_args(args).world_size == 16  # started by the command itself: the fewest (ep 8)
    monkeypatch.setenv("WORLD_SIZE", "32")
    layout = layout_from_args(args)
    assert (layout.data_parallel, layout.world_size) == (8, 32)
    assert layout == Layout.for_world(32, tp=2, pp=2, ep=8, etp=1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # two training nodes, no expert parallelism
    assert layout_from_args(argparse.Namespace(tp=1, pp=1, ep=1, etp=1)).data_parallel == 2
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match="6 processes are not a multiple of tp 2 x pp 2 x cp 1 = 4"):
        layout_from_args(args)


@pytest.mark.slow
@pytest.mark.parametrize("save_layout,compare_layout", [("tp2", "single"), ("ep2", "pp2")])
def test_ddp_optimizer_and_dist_checkpointing_reshard(tmp_path, save_layout, compare_layout):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    saved = torchrun("mcore_train_ckpt.py", Layout.parse(save_layout).world_size,
                     "--layout", save_layout, "--ckpt", str(ckpt), "--phase", "save")
    saved_losses = json.loads(saved.stdout.split("LOSSES", 1)[1].strip().splitlines()[0])
    compared = torchrun("mcore_train_ckpt.py", Layout.parse(compare_layout).world_size,
                        "--layout", compare_layout, "--ckpt", str(ckpt), "--phase", "compare")
    report = json.loads(compared.stdout.split("CKPT_COMPARE", 1)[1].strip().splitlines()[0])
    assert report["worst"] < 1e-5
    # the same optimizer steps in two layouts give the same losses
    assert report["losses"] == pytest.approx(saved_losses, rel=1e-5)
    assert report["losses"][1] != pytest.approx(report["losses"][0], rel=1e-6)  # training moved
