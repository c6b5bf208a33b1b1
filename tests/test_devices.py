"""Device and backend discipline, as far as a CPU can show it: micro-batches are built on the host
and must reach the model's device in every forward step (training, scoring), attention must build
its masks where the scores live, and a GPU run's default group must carry host tensors too.

The model here lives on the ``meta`` device (shape-only tensors): a host tensor handed to it is a
device mismatch, just as a CPU tensor handed to a CUDA model is."""

import types

import pytest
import torch

from megatron_vespo.batch import Sample, build_micro_batch
from megatron_vespo.hook import HookGroups, make_forward_step, make_scoring_step
from megatron_vespo.losses import LossConfig


class MetaModel(torch.nn.Module):
    """Records the devices of what the forward step hands it; answers shape-only logits."""

    def __init__(self, vocab=16):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(4, device="meta"))
        self.vocab, self.seen = vocab, []

    def forward(self, tokens, position_ids, attention_mask, packed_seq_params=None, output_processor=None,
                output_processor_context=None):
        self.seen = [tokens.device, position_ids.device]
        if packed_seq_params is not None:
            self.seen += [packed_seq_params.cu_seqlens_q.device, packed_seq_params.cu_seqlens_q_padded.device]
        if output_processor is not None:  # scoring from hidden states: the rows and targets it is given
            rows, targets = output_processor_context[:2]
            self.seen += [rows.device, targets.device]
            return torch.empty(rows.shape, device="meta")
        return torch.empty(*tokens.shape, self.vocab, device="meta")


def _micro_batch():
    samples = [Sample(torch.tensor([1, 2, 3, 4, 5]), 2, 0.5, torch.full((3,), -1.0), torch.full((3,), -1.1)),
               Sample(torch.tensor([6, 7, 8]), 1, -0.5, torch.full((2,), -1.0), torch.full((2,), -0.9))]
    return build_micro_batch(samples, "packed")


@pytest.mark.parametrize("which", ["training", "scoring from logits", "scoring from hidden states"])
def test_forward_steps_move_host_batches_to_the_models_device(which, monkeypatch):
    from megatron_vespo.mcore import versions

    mb = _micro_batch()
    assert mb.tokens.device.type == "cpu"
    model = MetaModel()
    if which == "training":
        step = make_forward_step(LossConfig(name="vespo", correction="fold"), HookGroups())
    else:
        monkeypatch.setattr(versions, "has_output_processor", lambda: True)  # the model here takes it
        step = make_scoring_step(lambda *args: None, groups=HookGroups(), from_hidden=which.endswith("states"))
    output, loss_func = step(iter([mb]), model)
    assert len(model.seen) == (6 if which.endswith("states") else 4)
    assert all(device.type == "meta" for device in model.seen), model.seen
    assert output.device.type == "meta"
    moved = loss_func.args[0] if which == "training" else None  # the hook keeps the moved batch
    if moved is not None:
        assert all(t.device.type == "meta" for t in (moved.labels, moved.loss_mask, moved.old_logp,
                                                     moved.engine_logp, moved.seq_index, moved.advantages))


def test_a_batch_already_on_the_device_is_not_copied():
    mb = _micro_batch()
    assert mb.to("cpu") is mb
    on_meta = mb.to("meta")
    assert on_meta.tokens.device.type == "meta" and on_meta.cu_seqlens_padded.device.type == "meta"
    assert on_meta.sample_ids == mb.sample_ids and mb.tokens.device.type == "cpu"  # the host batch is kept


def test_attention_builds_its_mask_where_the_scores_live():
    from megatron_vespo.mcore.attention import ContextParallelLocalAttention
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    config = types.SimpleNamespace(num_attention_heads=4, num_query_groups=2, kv_channels=8, attention_dropout=0.0)
    groups = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 1), cp=None)
    attention = ContextParallelLocalAttention.__new__(ContextParallelLocalAttention)
    torch.nn.Module.__init__(attention)
    attention.cp_group, attention.heads, attention.groups, attention.head_dim = None, 4, 2, 8
    attention.softmax_scale = 8 ** -0.5
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=4, max_seqlen_kv=4)
    q = torch.empty(8, 4, 8, device="meta")
    kv = torch.empty(8, 2, 8, device="meta")
    out = attention(q, kv, kv, None, packed_seq_params=packed)
    assert out.device.type == "meta" and tuple(out.shape) == (8, 32)
    assert config and groups and AttnMaskType  # the module's own constructor needs Megatron's state


def test_a_gpu_run_uses_gloo_for_host_tensors_and_nccl_for_cuda(monkeypatch):
    from megatron_vespo.mcore import parallel

    seen = {}
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel.dist, "init_process_group", lambda backend: seen.setdefault("backend", backend))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: seen.setdefault("device", index))
    # init_distributed fills in torchrun's variables: set here, so that they are gone afterwards (a
    # WORLD_SIZE left in this process would make later CLI tests skip their torchrun launch)
    for name, value in (("LOCAL_RANK", "3"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29999")):
        monkeypatch.setenv(name, value)
    parallel.init_distributed()
    assert seen == {"backend": "cpu:gloo,cuda:nccl", "device": 3}


@pytest.mark.slow
def test_a_gpu_without_transformer_engine_gets_the_local_spec_patches():
    """Megatron's router names te_general_gemm with or without TE, and its local norm refuses
    sequence parallelism: on a GPU machine without TE those two patches apply, the CPU ones not."""
    import subprocess
    import sys

    from tests.conftest import ROOT, _env

    code = ("import torch; torch.cuda.is_available = lambda: True\n"
            "from megatron_vespo.mcore import cpu\n"
            "assert cpu.apply_cpu_patches() == []\n"
            "assert cpu.apply_local_spec_patches() == ['te_general_gemm', 'sequence_parallel_torch_norm', "
                "'torch_adam_step_on_load']\n"
            "from megatron.core.transformer.moe import moe_utils\n"
            "assert moe_utils.te_general_gemm is None and cpu.applied_patches() == list(cpu.LOCAL_SPEC_PATCHES)\n"
            "print('LOCAL_SPEC_OK')")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert "LOCAL_SPEC_OK" in proc.stdout, proc.stderr[-2000:]


def _run_python(code: str) -> str:
    import subprocess
    import sys

    from tests.conftest import ROOT, _env

    proc = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_every_parameter_is_built_on_the_models_device():
    """Megatron creates the router's gate weight on the host even on a GPU (moe/router.py) and moves
    only its .data at the first forward, after DDP hooked the host tensor: on a GPU its gradient
    never reached main_grad (the GPU parity check found a zero router gradient). With the model's
    device made ``meta`` here, a parameter left on the host shows up."""
    out = _run_python(
        "import torch\n"
        "from megatron_vespo.mcore import model as mm\n"
        "from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel\n"
        "from megatron_vespo.parity.worker import tiny_model_config\n"
        "initialize_model_parallel(Layout())\n"
        "mm.parameter_device = lambda: torch.device('meta')\n"
        "m = tiny_model_config()\n"
        "gpt = mm.build_gpt_model(m, mm.transformer_config(m, Layout()))\n"
        "names = [n for n, p in gpt.named_parameters()]\n"
        "assert any('router.weight' in n for n in names)\n"
        "print('LEFT:', [n for n, p in gpt.named_parameters() if p.device.type != 'meta'])\n")
    assert "LEFT: []" in out, out


@pytest.mark.slow
def test_the_local_spec_uses_torch_norms_even_with_apex_installed():
    """gpt_layer_specs.py chooses the final norm from a module-level LNImpl, apex's FusedLayerNorm
    when apex imports, which rejects RMSNorm; here that choice is forced as apex would make it."""
    out = _run_python(
        "from megatron.core.models.gpt import gpt_layer_specs\n"
        "from megatron.core.fusions.fused_layer_norm import FusedLayerNorm\n"
        "gpt_layer_specs.LNImpl = FusedLayerNorm  # what 'import apex' succeeding selects\n"
        "from megatron.core.transformer.torch_norm import WrappedTorchNorm\n"
        "from megatron_vespo.mcore import model as mm\n"
        "from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel\n"
        "from megatron_vespo.parity.worker import tiny_model_config\n"
        "initialize_model_parallel(Layout())\n"
        "m = tiny_model_config()\n"
        "spec = mm.layer_spec(mm.transformer_config(m, Layout()))\n"
        "norms = [spec.layer_norm] + [getattr(l.submodules, k) for l in spec.layer_specs\n"
        "         for k in ('input_layernorm', 'pre_mlp_layernorm')]\n"
        "print('FUSED:', [n for n in norms if n is FusedLayerNorm], 'FINAL:', spec.layer_norm is WrappedTorchNorm)\n")
    assert "FUSED: [] FINAL: True" in out, out


@pytest.mark.parametrize("config, world, refused", [("cuda:nccl", 2, True), ("cpu:gloo,cuda:nccl", 2, False),
                                                     ("cpu:gloo,cuda:gloo", 4, False), ("cuda:nccl", 1, False)])
def test_a_default_group_without_a_cpu_backend_is_refused_by_name(monkeypatch, config, world, refused):
    """A launcher that initialised torch.distributed with plain "nccl" before us: the export's
    buckets, object broadcasts and route gathers (host tensors) would fail at the first collective
    ("No backend type associated with device type cpu"); it is refused at start, by name."""
    from megatron_vespo.mcore import parallel

    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(parallel.dist, "get_backend_config", lambda: config)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: world)
    if refused:
        with pytest.raises(RuntimeError, match="'cuda:nccl', which has no CPU backend"):
            parallel.init_distributed()
    else:
        parallel.init_distributed()


@pytest.mark.slow
def test_every_megatron_group_the_project_uses_inherits_the_default_backends():
    """Host tensors (export buckets, route gathers, object broadcasts, metrics) go through
    Megatron's groups; under the default "cpu:gloo,cuda:nccl" they are safe only if those groups
    inherit both backends, i.e. Megatron creates none of them NCCL-only (parallel_state.py passes
    backend=None except for its explicit gloo groups). CPU torch has no NCCL: "cpu:gloo,cuda:gloo"
    stands for the GPU default here; a group Megatron made NCCL-only would fail to be created here
    (no NCCL in this torch), and one with other backends than the default is named."""
    out = _run_python(
        "import torch.distributed as dist\n"
        "from megatron.core import parallel_state as ps\n"
        "from megatron_vespo.mcore import parallel\n"
        "from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel\n"
        "import os\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', RANK='0', WORLD_SIZE='1', LOCAL_RANK='0')\n"
        "parallel.init_distributed('cpu:gloo,cuda:gloo')\n"
        "initialize_model_parallel(Layout())\n"
        "default = dist.get_backend_config()\n"
        "getters = ['get_tensor_model_parallel_group', 'get_pipeline_model_parallel_group',\n"
        "           'get_data_parallel_group', 'get_context_parallel_group', 'get_expert_model_parallel_group',\n"
        "           'get_expert_tensor_parallel_group', 'get_tensor_and_context_parallel_group',\n"
        "           'get_expert_data_parallel_group', 'get_model_parallel_group', 'get_embedding_group']\n"
        "bad = {g: dist.get_backend_config(getattr(ps, g)()) for g in getters\n"
        "       if dist.get_backend_config(getattr(ps, g)()) != default}\n"
        "print('DEFAULT', default, 'DIFFERENT', bad)\n")
    assert "DEFAULT cpu:gloo,cuda:gloo DIFFERENT {}" in out, out
