"""Hugging Face (Qwen3-MoE) tensor names <-> this rank's Megatron-Core local-spec parameters.

``local_tensor(name)`` gives, for a Megatron parameter of this rank, the slice of the full HF
tensors it holds, so the same function shards weights on load and shards reference gradients
for comparison. Layout rules (Megatron-Core 0.16 local spec):

* ``linear_qkv``: per query group g, rows [q heads of g | k_g | v_g]; TP splits whole groups;
* ``linear_fc1`` (gated): each (expert-)TP rank holds [gate shard ; up shard];
* row-parallel weights (``linear_proj``, ``linear_fc2``) split dim 1; embedding/output dim 0;
* experts: local expert j on EP rank r is global expert r * (E / ep) + j;
* norms and the router are replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megatron_vespo.mcore.model import MoEModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")


@dataclass(frozen=True)
class ShardContext:
    model: MoEModelConfig
    tp: int
    tp_rank: int
    etp: int
    etp_rank: int
    ep: int
    ep_rank: int
    layer_numbers: tuple[int, ...]  # global 0-based layer id of each local layer

    @classmethod
    def from_model(cls, gpt_model, model_cfg: MoEModelConfig) -> "ShardContext":
        from megatron.core import parallel_state as ps

        layers = tuple(layer.layer_number - 1 for layer in gpt_model.decoder.layers)
        return cls(
            model=model_cfg,
            tp=ps.get_tensor_model_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            etp=ps.get_expert_tensor_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            ep=ps.get_expert_model_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            layer_numbers=layers,
        )


def _split(t: torch.Tensor, parts: int, rank: int, dim: int) -> torch.Tensor:
    if t.shape[dim] % parts:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} is not divisible by {parts}")
    return t.chunk(parts, dim=dim)[rank].contiguous()


def fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: MoEModelConfig) -> torch.Tensor:
    """Megatron's interleaved [group: q heads, k, v] rows from HF q/k/v projections."""
    groups, d = m.num_query_groups, m.head_dim
    per_group = m.num_attention_heads // groups
    q = q.view(groups, per_group * d, -1)
    k = k.view(groups, d, -1)
    v = v.view(groups, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per_group + 2) * d, -1)


def _gated_fc1(gate: torch.Tensor, up: torch.Tensor, parts: int, rank: int) -> torch.Tensor:
    return torch.cat([_split(gate, parts, rank, 0), _split(up, parts, rank, 0)], dim=0)


def hf_names(m: MoEModelConfig) -> list[str]:
    """Every HF tensor name of the model, in a stable order."""
    names = ["model.embed_tokens.weight"]
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if m.qk_layernorm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += [p + "post_attention_layernorm.weight"]
        if i in m.dense_layers:
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        else:
            names += [p + "mlp.gate.weight"]
            for e in range(m.num_experts):
                names += [p + f"mlp.experts.{e}.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names + ["model.norm.weight", "lm_head.weight"]


def local_tensor(name: str, hf: dict[str, torch.Tensor], ctx: ShardContext) -> torch.Tensor:
    """The part of the full HF tensors ``hf`` that Megatron parameter ``name`` holds on this rank."""
    m = ctx.model
    if name == "embedding.word_embeddings.weight":
        return _split(hf["model.embed_tokens.weight"], ctx.tp, ctx.tp_rank, 0)
    if name == "output_layer.weight":
        return _split(hf["lm_head.weight"], ctx.tp, ctx.tp_rank, 0)
    if name == "decoder.final_layernorm.weight":
        return hf["model.norm.weight"]
    match = _LAYER.match(name)
    if not match:
        raise KeyError(f"no Hugging Face mapping for Megatron parameter {name!r}")
    layer = ctx.layer_numbers[int(match.group(1))]
    rest = match.group(2)
    p = f"model.layers.{layer}."
    simple = {
        "input_layernorm.weight": p + "input_layernorm.weight",
        "pre_mlp_layernorm.weight": p + "post_attention_layernorm.weight",
        "self_attention.q_layernorm.weight": p + "self_attn.q_norm.weight",
        "self_attention.k_layernorm.weight": p + "self_attn.k_norm.weight",
        "mlp.router.weight": p + "mlp.gate.weight",
    }
    if rest in simple:
        return hf[simple[rest]]
    if rest == "self_attention.linear_qkv.weight":
        qkv = fused_qkv(*(hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"), m)
        return _split(qkv, ctx.tp, ctx.tp_rank, 0)
    if rest == "self_attention.linear_proj.weight":
        return _split(hf[p + "self_attn.o_proj.weight"], ctx.tp, ctx.tp_rank, 1)
    if rest == "mlp.linear_fc1.weight":
        return _gated_fc1(hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"], ctx.tp, ctx.tp_rank)
    if rest == "mlp.linear_fc2.weight":
        return _split(hf[p + "mlp.down_proj.weight"], ctx.tp, ctx.tp_rank, 1)
    expert = _EXPERT.match(rest)
    if expert:
        e = ctx.ep_rank * (m.num_experts // ctx.ep) + int(expert.group(1))
        q = p + f"mlp.experts.{e}."
        if expert.group(2) == "linear_fc1":
            return _gated_fc1(hf[q + "gate_proj.weight"], hf[q + "up_proj.weight"], ctx.etp, ctx.etp_rank)
        return _split(hf[q + "down_proj.weight"], ctx.etp, ctx.etp_rank, 1)
    raise KeyError(f"no Hugging Face mapping for Megatron parameter {name!r}")


@torch.no_grad()
def load_hf_state(gpt_model, hf: dict[str, torch.Tensor], ctx: ShardContext) -> int:
    """Copy the full HF tensors into this rank's parameters; returns how many were set."""
    count = 0
    for name, param in gpt_model.named_parameters():
        value = local_tensor(name, hf, ctx)
        if value.shape != param.shape:
            raise ValueError(
                f"{name}: Hugging Face tensors give shape {tuple(value.shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
        param.copy_(value)
        count += 1
    return count
