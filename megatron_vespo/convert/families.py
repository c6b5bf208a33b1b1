"""Hugging Face ``config.json`` -> :class:`MoEModelConfig`, for both transformers 4 and 5 layouts.

Every value the model needs is read explicitly; a key that is missing where the architecture
needs it, two keys that disagree, or a feature this project does not implement (rope scaling,
sliding windows, biases beyond Qwen2's QKV bias) raise a clear error instead of a silent default.
"""

from __future__ import annotations

import json
import os

from megatron_vespo.mcore.model import MoEModelConfig

SUPPORTED = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}


def load_hf_config(path: str) -> dict:
    """The ``config.json`` of a Hugging Face model directory (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json at {path}")
    with open(file) as f:
        return json.load(f)


def _require(cfg: dict, key: str, family: str):
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{family} config.json lacks {key!r}")
    return cfg[key]


def _one_of(cfg: dict, keys: tuple[str, ...], family: str):
    """The value under any of ``keys`` (names differ between transformers majors); they must agree."""
    found = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    if not found:
        raise ValueError(f"{family} config.json has none of {keys}")
    if len(set(map(json.dumps, found.values()))) > 1:
        raise ValueError(f"{family} config.json gives conflicting values {found}")
    return next(iter(found.values()))


def rope_theta(cfg: dict, family: str) -> float:
    """transformers 5 keeps it in ``rope_parameters``; 4 at the top level (with ``rope_scaling``)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in (None, "default"):
        raise ValueError(f"{family}: rope type {kind!r} is not supported (only unscaled RoPE)")
    values = {}
    if "rope_theta" in params:
        values["rope_parameters.rope_theta"] = float(params["rope_theta"])
    if cfg.get("rope_theta") is not None:
        values["rope_theta"] = float(cfg["rope_theta"])
    if not values:
        raise ValueError(f"{family} config.json has neither rope_parameters.rope_theta (transformers 5) "
                         f"nor rope_theta (transformers 4)")
    if len(set(values.values())) > 1:
        raise ValueError(f"{family} config.json gives conflicting rope bases {values}")
    return next(iter(values.values()))


def dense_layer_ids(cfg: dict, n_layers: int, family: str) -> tuple[int, ...]:
    """Dense layer ids of Qwen-style MoE: layer i is sparse iff not in mlp_only_layers and
    (i + 1) % decoder_sparse_step == 0."""
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    bad = [i for i in mlp_only if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"{family}: mlp_only_layers {bad} outside [0, {n_layers})")
    return tuple(i for i in range(n_layers) if i in mlp_only or (i + 1) % step != 0)


def _padding_idx(cfg: dict) -> int | None:
    """transformers' nn.Embedding padding_idx (pad_token_id; negative counts from the end)."""
    pad = cfg.get("pad_token_id")
    if pad is None:
        return None
    pad = int(pad)
    return pad + int(cfg["vocab_size"]) if pad < 0 else pad


def model_config_from_hf(cfg: dict) -> MoEModelConfig:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        archs = cfg.get("architectures")
        raise ValueError(f"unsupported architecture: model_type {model_type!r} ({archs}); "
                         f"supported: {sorted(SUPPORTED)}")
    family = model_type
    heads = int(_require(cfg, "num_attention_heads", family))
    hidden = int(_require(cfg, "hidden_size", family))
    layers = int(_require(cfg, "num_hidden_layers", family))
    head_dim = cfg.get("head_dim") or hidden // heads
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"{family}: attention_bias/mlp_bias are not supported")
    if cfg.get("use_sliding_window") or (family == "mixtral" and cfg.get("sliding_window")):
        raise ValueError(f"{family}: sliding-window attention is not supported")
    common = dict(
        family=family,
        vocab_size=int(_require(cfg, "vocab_size", family)),
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        ffn_hidden_size=int(_require(cfg, "intermediate_size", family)),
        rope_theta=rope_theta(cfg, family),
        rms_norm_eps=float(_require(cfg, "rms_norm_eps", family)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qk_layernorm=family in ("qwen3_moe", "qwen3"),
        padding_idx=_padding_idx(cfg),
    )
    if family in ("qwen3", "llama"):
        return MoEModelConfig(**common, num_experts=0, moe_router_topk=0, moe_ffn_hidden_size=0).validate()
    if family == "mixtral":
        experts = int(_one_of(cfg, ("num_local_experts", "num_experts"), family))
        return MoEModelConfig(
            **{**common, "ffn_hidden_size": common["ffn_hidden_size"]},
            num_experts=experts,
            moe_router_topk=int(_require(cfg, "num_experts_per_tok", family)),
            moe_ffn_hidden_size=common["ffn_hidden_size"],  # every Mixtral MLP is an expert
            router_pre_softmax=False,  # softmax, top-k, renormalise == top-k then softmax
        ).validate()
    # transformers 4 writes num_experts, 5 writes num_local_experts (4 ignores the new key)
    experts = int(_one_of(cfg, ("num_experts", "num_local_experts"), family))
    qwen2 = family == "qwen2_moe"
    return MoEModelConfig(
        **common,
        num_experts=experts,
        moe_router_topk=int(_require(cfg, "num_experts_per_tok", family)),
        moe_ffn_hidden_size=int(_require(cfg, "moe_intermediate_size", family)),
        dense_layers=dense_layer_ids(cfg, layers, family),
        # norm_topk_prob=False: softmax over all experts, top-k probabilities not renormalised
        router_pre_softmax=not bool(cfg.get("norm_topk_prob", False)),
        qkv_bias=bool(cfg.get("qkv_bias", True)) if qwen2 else False,
        shared_expert_size=int(cfg.get("shared_expert_intermediate_size") or 0) if qwen2 else 0,
        shared_expert_gate=qwen2 and bool(cfg.get("shared_expert_intermediate_size")),
    ).validate()
