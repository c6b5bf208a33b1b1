"""Hugging Face -> Megatron-Core: config mapping for both transformers majors, the weight mapping,
and fp32 logits equal to transformers' own for every family under real layouts."""

import json

import pytest
import torch

from megatron_vespo.convert.families import model_config_from_hf, rope_theta
from megatron_vespo.mcore.model import MoEModelConfig
from megatron_vespo.mcore.weights import DictSource, ShardContext, hf_shapes, local_tensor
from tests.conftest import torchrun

# Qwen3-30B-A3B-Base's config.json as transformers 4 wrote it (abridged to the keys that matter)
QWEN3_30B_V4 = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "rope_theta": 1000000.0, "rope_scaling": None, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
    "max_position_embeddings": 40960, "attention_bias": False, "use_sliding_window": False,
}


def v5_layout(cfg: dict) -> dict:
    """The same model as transformers 5 writes it: rope in rope_parameters, num_local_experts."""
    out = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling", "num_experts")}
    out["rope_parameters"] = {"rope_theta": cfg["rope_theta"], "rope_type": "default"}
    out["num_local_experts"] = cfg["num_experts"]
    return out


def test_both_transformers_majors_give_the_same_model():
    v4 = model_config_from_hf(QWEN3_30B_V4)
    v5 = model_config_from_hf(v5_layout(QWEN3_30B_V4))
    assert v4 == v5
    assert v4.num_experts == 128 and v4.moe_router_topk == 8 and v4.rope_theta == 1e6
    assert v4.head_dim == 128 and v4.hidden_size // v4.num_attention_heads == 64  # independent
    assert v4.qk_layernorm and not v4.router_pre_softmax and v4.dense_layers == ()


def test_sparse_step_and_mlp_only_layers_give_dense_layers():
    cfg = dict(QWEN3_30B_V4, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    assert model_config_from_hf(cfg).dense_layers == (0, 2, 3, 4)


def test_qwen2_moe_router_and_shared_expert():
    cfg = dict(QWEN3_30B_V4, model_type="qwen2_moe", norm_topk_prob=False, shared_expert_intermediate_size=512)
    cfg.pop("head_dim")
    m = model_config_from_hf(cfg)
    assert m.router_pre_softmax and m.qkv_bias and m.shared_expert_size == 512 and m.shared_expert_gate
    assert not m.qk_layernorm and m.head_dim == 64


@pytest.mark.parametrize("change,message", [
    ({"model_type": "deepseek_v3"}, "unsupported architecture: model_type 'deepseek_v3'"),
    ({"rope_theta": None}, "neither rope_parameters.rope_theta"),
    ({"rope_parameters": {"rope_theta": 5.0, "rope_type": "default"}}, "conflicting rope bases"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"num_local_experts": 64}, "conflicting values"),
    ({"num_experts": None}, "has none of ('num_experts', 'num_local_experts')"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"mlp_only_layers": [99]}, "mlp_only_layers [99] outside"),
])
def test_config_errors_are_named(change, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[")):
        model_config_from_hf({**QWEN3_30B_V4, **change})


def test_rope_theta_reads_either_layout():
    assert rope_theta({"rope_theta": 7.0}, "llama") == 7.0
    assert rope_theta({"rope_parameters": {"rope_theta": 9.0}}, "llama") == 9.0


def _ctx(m, **ranks):
    base = dict(tp=1, tp_rank=0, etp=1, etp_rank=0, ep=1, ep_rank=0, layer_numbers=tuple(range(m.num_layers)))
    return ShardContext(model=m, **{**base, **ranks})


def test_transformer_engine_names_map_to_the_same_tensors():
    m = MoEModelConfig(num_layers=1, num_experts=4, dense_layers=())
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(shape, generator=gen) for n, shape in hf_shapes(m).items()}
    ctx = _ctx(m, ep=2, ep_rank=1)
    pairs = [
        ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.0.input_layernorm.weight"),
        ("decoder.layers.0.mlp.experts.linear_fc1.weight1", "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"),
        ("decoder.layers.0.mlp.experts.linear_fc2.weight0", "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"),
    ]
    for te, local in pairs:
        assert torch.equal(local_tensor(te, tensors, ctx), local_tensor(local, tensors, ctx))
    # EP rank 1 of 2 holds global experts 2 and 3
    fc2 = local_tensor("decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight", tensors, ctx)
    assert torch.equal(fc2, tensors["model.layers.0.mlp.experts.3.down_proj.weight"])


def test_qkv_bias_is_interleaved_like_the_weight():
    m = MoEModelConfig(family="qwen2_moe", num_layers=1, num_attention_heads=4, num_query_groups=2, head_dim=2,
                       hidden_size=8, qkv_bias=True, num_experts=2)
    tensors = {"model.layers.0.self_attn.q_proj.bias": torch.arange(8.0),
               "model.layers.0.self_attn.k_proj.bias": 100 + torch.arange(4.0),
               "model.layers.0.self_attn.v_proj.bias": 200 + torch.arange(4.0)}
    got = local_tensor("decoder.layers.0.self_attention.linear_qkv.bias", tensors, _ctx(m, tp=2, tp_rank=1))
    assert got.tolist() == [4, 5, 6, 7, 102, 103, 202, 203]  # group 1: its two q heads, k_1, v_1


def test_missing_tensor_and_bad_division_are_named():
    m = MoEModelConfig(num_layers=1, num_experts=4)
    with pytest.raises(KeyError, match="missing tensor 'model.layers.0.mlp.gate.weight'"):
        local_tensor("decoder.layers.0.mlp.router.weight", {}, _ctx(m))
    tensors = {"model.embed_tokens.weight": torch.zeros(5, 3)}
    with pytest.raises(ValueError, match="dimension 0 of size 5 is not divisible by 2"):
        local_tensor("embedding.word_embeddings.weight", DictSource(tensors), _ctx(m, tp=2))
    with pytest.raises(KeyError, match="no Hugging Face mapping"):
        local_tensor("decoder.layers.0.mystery.weight", tensors, _ctx(m))


@pytest.fixture(scope="module")
def hf_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_models")


def _report(proc):
    return json.loads(proc.stdout.split("HF_LOGITS", 1)[1].strip().splitlines()[0])


@pytest.mark.slow
@pytest.mark.parametrize("layout,nproc", [("single", 1), ("tp2", 2), ("ep2", 2), ("pp2", 2), ("pp2vpp2", 2),
                                          ("tp2ep2", 4)])
def test_hf_logits_match_transformers_and_export_round_trips(hf_workdir, layout, nproc):
    report = _report(torchrun("hf_logits.py", nproc, "--layout", layout, "--roundtrip",
                              "--workdir", str(hf_workdir)))
    families = {"qwen3_moe", "qwen2_moe", "mixtral"} | ({"qwen3", "llama"} if "ep" not in layout else set())
    assert set(report) == families
    for family, r in report.items():
        assert r["rel_diff"] <= 1e-5, (family, r)
        # HF -> Megatron (this layout) -> HF in 16 KiB buckets is bit-exact, one file per bucket
        assert r["roundtrip"]["exact"], (family, r)
        assert r["roundtrip"]["files"] == r["roundtrip"]["planned"] > 1
        if layout == "tp2":
            assert r["max_read_fraction"] < 0.6, (family, r)  # each rank reads only its slices


@pytest.mark.slow
def test_swapped_experts_are_detected(hf_workdir):
    report = _report(torchrun("hf_logits.py", 2, "--layout", "ep2", "--families", "qwen3_moe,mixtral",
                              "--negative-control", "--workdir", str(hf_workdir)))
    for family, r in report.items():
        assert r["rel_diff"] > 1e-2, (family, r)


def test_buckets_are_bounded_and_ordered():
    from megatron_vespo.convert.export import plan_buckets

    m = MoEModelConfig(num_layers=2, num_experts=4)
    shapes = hf_shapes(m)
    buckets = plan_buckets(m, torch.bfloat16, 20_000)
    assert [n for b in buckets for n in b] == list(shapes)  # every tensor once, in order
    for b in buckets:
        nbytes = sum(2 * torch.Size(shapes[n]).numel() for n in b)
        assert nbytes <= 20_000 or len(b) == 1
    with pytest.raises(ValueError, match="bucket_bytes must be > 0"):
        plan_buckets(m, torch.float32, 0)


def test_runs_merge_into_strided_blocks_that_copy_back_exactly():
    from megatron_vespo.convert.export import _assemble, _blocks

    # a [6, 8] HF tensor (id 0) split by columns over two ranks, plus a whole [4] tensor (id 1)
    full = torch.arange(48.0).view(6, 8)
    left, right = full[:, :4].reshape(-1), full[:, 4:].reshape(-1)
    runs_left = [(0, 4 * r, 0, 8 * r, 4) for r in range(6)]
    runs_right = [(0, 4 * r, 0, 8 * r + 4, 4) for r in range(3)] + [(0, 12, 0, 30, 2), (0, 14, 0, 32, 2)]
    assert _blocks(runs_left) == [(0, 0, 0, 0, 8, 4, 6)]
    # a change of length or stride starts a new block instead of copying to the wrong place
    assert len(_blocks(runs_right)) == 2
    shapes = {"a": (6, 8), "b": (4,)}
    ids = {"a": 0, "b": 1}
    partial = torch.cat([right[:12], full[3, 6:8], full[4, 0:2]])
    sources = [([left], _blocks(runs_left)), ([partial], _blocks(runs_right)),
               ([torch.arange(4.0)], _blocks([(0, 0, 1, 0, 4)]))]
    with pytest.raises(RuntimeError, match="a received 40 of 48"):
        _assemble(["a", "b"], shapes, ids, sources, torch.float32)
    right_rest = full[3:, 4:].reshape(-1)
    runs_rest = [(0, 4 * r, 0, 8 * (r + 3) + 4, 4) for r in range(3)]
    out = dict(_assemble(["a", "b"], shapes, ids, sources[::2] + [([right[:12]], _blocks(runs_right[:3])),
                                                                   ([right_rest], _blocks(runs_rest))],
                         torch.float32))
    assert torch.equal(out["a"], full) and torch.equal(out["b"], torch.arange(4.0))
