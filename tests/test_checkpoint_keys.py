"""Checkpoints move between Megatron's TransformerEngine spec and its local spec
(megatron_vespo/mcore/checkpoint_keys.py).

TransformerEngine is not importable here, so the TE checkpoint's key names are built from
Megatron's own TE spec definitions: ``get_gpt_layer_with_transformer_engine_spec`` is called with
its ``TESpecProvider`` replaced by a stand-in that answers each module choice with a named
placeholder class. The returned spec tells, per layer kind, which norm TE fuses into the next
linear (``input_layernorm``/``pre_mlp_layernorm`` left as ``IdentityOp``, the linear a
``column_parallel_layer_norm_linear``, saved as ``<linear>.layer_norm_weight``) and which it keeps
as its own module (saved under its own name). A model of local modules saved with exactly those
names is a TE-named checkpoint."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT, _env

pytestmark = pytest.mark.slow  # every test here starts processes (conftest: the fast tier)

SCRIPT = r'''
import os, sys, warnings
warnings.simplefilter("ignore")
import torch
from megatron.core import dist_checkpointing
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.identity_op import IdentityOp
from megatron_vespo.mcore import model as mm
from megatron_vespo.mcore.checkpoint_keys import align_keys_to_checkpoint, stored_tensor_keys
from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel
from megatron_vespo.parity.worker import tiny_model_config

work = sys.argv[1]


def placeholder(name):
    return type(name, (), {})


class TEStructure:
    """Stands in for TESpecProvider: every module choice is a class named after the choice."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name == "grouped_mlp_modules":
            return lambda *a, **k: (placeholder("experts"), None)
        if name.startswith(("fuse", "is_")):
            return lambda *a, **k: True
        return lambda *a, **k: placeholder(name)


def te_names(num_experts):
    """sharded_state_dict_keys_map giving local modules the names TE's spec saves them under."""
    real = gpt_layer_specs.TESpecProvider if hasattr(gpt_layer_specs, "TESpecProvider") else None
    gpt_layer_specs.TESpecProvider = TEStructure
    try:
        te = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, qk_layernorm=True)
    finally:
        if real is None:
            del gpt_layer_specs.TESpecProvider
        else:
            gpt_layer_specs.TESpecProvider = real
    sub, names = te.submodules, {}
    fused = lambda linear: linear is not None and linear.__name__ == "column_parallel_layer_norm_linear"
    if sub.input_layernorm is IdentityOp and fused(sub.self_attention.submodules.linear_qkv):
        names["input_layernorm."] = "self_attention.linear_qkv.layer_norm_"
    # the MLP is a ModuleSpec up to Megatron-Core 0.18, a functools.partial of MLP.as_mlp_submodule in 0.19
    mlp_submodules = getattr(sub.mlp, "submodules", None) or getattr(sub.mlp, "keywords", {}).get("submodules")
    fc1 = getattr(mlp_submodules, "linear_fc1", None)
    if sub.pre_mlp_layernorm is IdentityOp and fused(fc1):
        names["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return names


def main():  # dist_checkpointing.save spawns workers that import this file again
    global m, config, dense_names, moe_names
    initialize_model_parallel(Layout())
    m = tiny_model_config()
    config = mm.transformer_config(m, Layout())
    dense_names, moe_names = te_names(None), te_names(m.num_experts)
    print("TE names: dense", dense_names, "moe", moe_names)
    local_spec = mm.layer_spec


    def te_named_spec(config, vp_stage=None):
        spec = local_spec(config, vp_stage)
        for i, layer in enumerate(spec.layer_specs):
            layer.submodules.sharded_state_dict_keys_map = dict(dense_names if i in m.dense_layers else moe_names)
        return spec


    def build(te_named, seed):
        mm.layer_spec = te_named_spec if te_named else local_spec
        try:
            gpt = mm.build_gpt_model(m, config)
        finally:
            mm.layer_spec = local_spec
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in gpt.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        return gpt


    def save(gpt, name):
        directory = os.path.join(work, name)
        os.makedirs(directory)
        dist_checkpointing.save(gpt.sharded_state_dict(), directory)
        return directory


    def load_into(gpt, directory, align):
        request = gpt.sharded_state_dict()
        renamed = align_keys_to_checkpoint(request, directory) if align else []
        gpt.load_state_dict(dist_checkpointing.load(request, directory))
        return renamed


    def same(a, b):
        pb = dict(b.named_parameters())
        return all(torch.equal(p, pb[n]) for n, p in a.named_parameters())


    te_model, local_model = build(True, 1), build(False, 2)
    te_dir, local_dir = save(te_model, "te"), save(local_model, "local")
    te_keys, local_keys = stored_tensor_keys(te_dir), stored_tensor_keys(local_dir)
    print("ONLY_TE", sorted(te_keys - local_keys))
    print("ONLY_LOCAL", sorted(local_keys - te_keys))
    try:
        load_into(build(False, 3), te_dir, align=False)
        print("UNALIGNED_LOADED")
    except BaseException as err:  # torch's CheckpointException is a BaseException
        print("UNALIGNED_FAILS", type(err).__name__)
    target = build(False, 4)
    renamed = load_into(target, te_dir, align=True)
    print("TE_INTO_LOCAL", same(target, te_model), len(renamed))
    target = build(True, 5)
    renamed = load_into(target, local_dir, align=True)
    print("LOCAL_INTO_TE", same(target, local_model), len(renamed))
    target = build(False, 6)
    print("LOCAL_INTO_LOCAL", same(target, local_model) is False and load_into(target, local_dir, True) == [] and same(target, local_model))


if __name__ == "__main__":
    main()
'''


def test_checkpoints_move_between_the_te_and_the_local_spec(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {line.split(" ", 1)[0]: line.split(" ", 1)[1] if " " in line else "" for line in proc.stdout.splitlines()}
    # Megatron's TE spec: dense layers fuse both norms, MoE layers keep the pre-MLP norm apart
    assert "'pre_mlp_layernorm.'" in out["TE"].split("moe")[0] and "pre_mlp" not in out["TE"].split("moe")[1]
    moe_layers = [i for i in range(4) if i != 0]
    assert out["ONLY_TE"] == str([f"decoder.layers.{i}.pre_mlp_layernorm.weight" for i in moe_layers])
    assert out["ONLY_LOCAL"] == str([f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight" for i in moe_layers])
    assert out["UNALIGNED_FAILS"]  # the defect: without the alias the load refuses
    assert out["TE_INTO_LOCAL"] == f"True {len(moe_layers)}"
    assert out["LOCAL_INTO_TE"] == f"True {len(moe_layers)}"
    assert out["LOCAL_INTO_LOCAL"] == "True"
