"""Hugging Face ``config.json`` -> :class:`MoEModelConfig`, for both transformers 4 and 5 layouts.

Every value the model needs is read explicitly; a key that is missing where the architecture
needs it, two keys that disagree, or a feature this project does not implement (rope scaling,
sliding windows, biases beyond Qwen2's QKV bias) raise a clear error instead of a silent default.
"""

from __future__ import annotations

import json
import os

from megatron_vespo.input_files import read_json_object
from megatron_vespo.mcore.model import MoEModelConfig

SUPPORTED = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}


def load_hf_config(path: str) -> dict:
    """The ``config.json`` of a Hugging Face model directory (or the file itself); errors name the
    file and say what is wrong with it (missing, a directory, not UTF-8, not JSON, not an object)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json at {path}")
    return read_json_object(file, "model config")


def load_model_config(path: str) -> tuple[dict, MoEModelConfig]:
    """(config.json, the model it describes) for a Hugging Face model directory (or its config.json);
    every error names the file."""
    hf_config = load_hf_config(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    return hf_config, model_config_from_hf(hf_config, where=file)


def _require(cfg: dict, key: str, family: str):
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{family} config.json lacks {key!r}")
    return cfg[key]


def _int(value, key: str, family: str, minimum: int = 1) -> int:
    """A size from config.json: an integer (2.0 too: some writers emit floats) of at least ``minimum``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{family} config.json: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _positive(value, key: str, family: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{family} config.json: {key} must be a finite number > 0, got {value!r}")
    return float(value)


def _one_of(cfg: dict, keys: tuple[str, ...], family: str):
    """The value under any of ``keys`` (names differ between transformers majors); they must agree."""
    found = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    if not found:
        raise ValueError(f"{family} config.json has none of {keys}")
    if len(set(map(json.dumps, found.values()))) > 1:
        raise ValueError(f"{family} config.json gives conflicting values {found}")
    return next(iter(found.values()))


def _mapping(cfg: dict, key: str, family: str) -> dict:
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{family} config.json: {key} must be an object, got {value!r}")
    return value


def rope_theta(cfg: dict, family: str) -> float:
    """transformers 5 keeps it in ``rope_parameters``; 4 at the top level (with ``rope_scaling``)."""
    params = _mapping(cfg, "rope_parameters", family)
    scaling = _mapping(cfg, "rope_scaling", family)
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in (None, "default"):
        raise ValueError(f"{family}: rope type {kind!r} is not supported (only unscaled RoPE)")
    values = {}
    if "rope_theta" in params:
        values["rope_parameters.rope_theta"] = _positive(params["rope_theta"], "rope_parameters.rope_theta", family)
    if cfg.get("rope_theta") is not None:
        values["rope_theta"] = _positive(cfg["rope_theta"], "rope_theta", family)
    if not values:
        raise ValueError(f"{family} config.json has neither rope_parameters.rope_theta (transformers 5) "
                         f"nor rope_theta (transformers 4)")
    if len(set(values.values())) > 1:
        raise ValueError(f"{family} config.json gives conflicting rope bases {values}")
    return next(iter(values.values()))


def dense_layer_ids(cfg: dict, n_layers: int, family: str) -> tuple[int, ...]:
    """Dense layer ids of Qwen-style MoE: layer i is sparse iff not in mlp_only_layers and
    (i + 1) % decoder_sparse_step == 0."""
    step = _int(cfg.get("decoder_sparse_step") or 1, "decoder_sparse_step", family)
    mlp_only = cfg.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in mlp_only):
        raise ValueError(f"{family} config.json: mlp_only_layers must be a list of layer ids, got {mlp_only!r}")
    bad = [i for i in mlp_only if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"{family}: mlp_only_layers {bad} outside [0, {n_layers})")
    return tuple(i for i in range(n_layers) if i in set(mlp_only) or (i + 1) % step != 0)


def _padding_idx(cfg: dict, vocab_size: int, family: str) -> int | None:
    """transformers' nn.Embedding padding_idx (pad_token_id; negative counts from the end)."""
    pad = cfg.get("pad_token_id")
    if pad is None:
        return None
    pad = _int(pad, "pad_token_id", family, minimum=-vocab_size)
    return pad + vocab_size if pad < 0 else pad


def model_config_from_hf(cfg: dict, where: str | None = None) -> MoEModelConfig:
    """``where`` (the config.json's path) prefixes every error, so the message names the file."""
    try:
        return _model_config_from_hf(cfg)
    except ValueError as err:
        if where is None:
            raise
        raise ValueError(f"{where}: {err}") from None


def _model_config_from_hf(cfg: dict) -> MoEModelConfig:
    if not isinstance(cfg, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED:
        archs = cfg.get("architectures")
        raise ValueError(f"unsupported architecture: model_type {model_type!r} ({archs}); "
                         f"supported: {sorted(SUPPORTED)}")
    family = model_type

    def size(key: str, minimum: int = 1) -> int:
        return _int(_require(cfg, key, family), key, family, minimum)

    def optional_size(key: str, default: int, minimum: int = 1) -> int:
        return _int(cfg[key], key, family, minimum) if cfg.get(key) else default

    heads = size("num_attention_heads")
    hidden = size("hidden_size")
    layers = size("num_hidden_layers")
    vocab = size("vocab_size")
    head_dim = optional_size("head_dim", hidden // heads)
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"{family}: attention_bias/mlp_bias are not supported")
    if cfg.get("use_sliding_window") or (family == "mixtral" and cfg.get("sliding_window")):
        raise ValueError(f"{family}: sliding-window attention is not supported")
    common = dict(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_query_groups=optional_size("num_key_value_heads", heads),
        head_dim=head_dim,
        ffn_hidden_size=size("intermediate_size"),
        rope_theta=rope_theta(cfg, family),
        rms_norm_eps=_positive(_require(cfg, "rms_norm_eps", family), "rms_norm_eps", family),
        max_position_embeddings=optional_size("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qk_layernorm=family in ("qwen3_moe", "qwen3"),
        padding_idx=_padding_idx(cfg, vocab, family),
    )
    if family in ("qwen3", "llama"):
        return MoEModelConfig(**common, num_experts=0, moe_router_topk=0, moe_ffn_hidden_size=0).validate()
    if family == "mixtral":
        experts = _int(_one_of(cfg, ("num_local_experts", "num_experts"), family), "num_local_experts", family)
        return MoEModelConfig(
            **{**common, "ffn_hidden_size": common["ffn_hidden_size"]},
            num_experts=experts,
            moe_router_topk=size("num_experts_per_tok"),
            moe_ffn_hidden_size=common["ffn_hidden_size"],  # every Mixtral MLP is an expert
            router_pre_softmax=False,  # softmax, top-k, renormalise == top-k then softmax
        ).validate()
    # transformers 4 writes num_experts, 5 writes num_local_experts (4 ignores the new key)
    experts = _int(_one_of(cfg, ("num_experts", "num_local_experts"), family), "num_experts", family)
    qwen2 = family == "qwen2_moe"
    return MoEModelConfig(
        **common,
        num_experts=experts,
        moe_router_topk=size("num_experts_per_tok"),
        moe_ffn_hidden_size=size("moe_intermediate_size"),
        dense_layers=dense_layer_ids(cfg, layers, family),
        # norm_topk_prob=False: softmax over all experts, top-k probabilities not renormalised
        router_pre_softmax=not bool(cfg.get("norm_topk_prob", False)),
        qkv_bias=bool(cfg.get("qkv_bias", True)) if qwen2 else False,
        shared_expert_size=optional_size("shared_expert_intermediate_size", 0) if qwen2 else 0,
        shared_expert_gate=qwen2 and bool(cfg.get("shared_expert_intermediate_size")),
    ).validate()
