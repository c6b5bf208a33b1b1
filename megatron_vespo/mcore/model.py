"""Build a Megatron-Core MoE GPT (Qwen3-MoE shaped) for the current parallel layout.

The builder chooses the settings Megatron-Core needs and refuses user overrides that contradict
them, naming the setting:

* ``add_bias_linear=False`` with MoE (True fails in mlp.py's in-place add on a TP view);
* ``sequence_parallel=True`` whenever TP > 1 with MoE (``MoELayer`` requires it);
* the MoE load-balancing aux loss is off unless asked for (RL default);
* on CPU (or without TransformerEngine): local spec, SequentialMLP experts, fusions off, and
  :class:`~megatron_vespo.mcore.attention.ContextParallelLocalAttention` as core attention.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


# auto (TE when it is importable on a GPU), local, or te: to compare the two specs on one machine
LAYER_SPEC_ENV = "MEGATRON_VESPO_LAYER_SPEC"


def use_transformer_engine() -> bool:
    choice = os.environ.get(LAYER_SPEC_ENV, "auto")
    if choice not in ("auto", "local", "te"):
        raise ValueError(f"{LAYER_SPEC_ENV}={choice!r}: choose auto, local or te")
    if choice == "te" and not transformer_engine_available():
        raise ValueError(f"{LAYER_SPEC_ENV}=te needs TransformerEngine importable and a GPU")
    return choice != "local" and transformer_engine_available()


FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "qwen3", "llama")


@dataclass
class MoEModelConfig:
    """Architecture in Hugging Face terms (Qwen3-MoE by default; ``num_experts=0`` is dense)."""

    family: str = "qwen3_moe"
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 4
    num_attention_heads: int = 4
    num_query_groups: int = 2
    head_dim: int = 16
    ffn_hidden_size: int = 128  # dense layers
    moe_ffn_hidden_size: int = 32
    num_experts: int = 8
    moe_router_topk: int = 2
    dense_layers: tuple[int, ...] = ()  # 0-based ids of layers with a dense MLP
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qk_layernorm: bool = True
    max_position_embeddings: int = 4096
    moe_aux_loss_coeff: float = 0.0
    qkv_bias: bool = False  # Qwen2-MoE
    shared_expert_size: int = 0  # Qwen2-MoE shared expert (0: none)
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    router_pre_softmax: bool = False  # softmax over all experts, top-k NOT renormalised
    tie_word_embeddings: bool = False
    # HF pad_token_id: transformers builds nn.Embedding(padding_idx=pad_token_id), whose row never
    # receives a gradient from the input lookup; the Megatron model does the same (freeze_padding_row)
    padding_idx: int | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def validate(self) -> "MoEModelConfig":
        if self.family not in FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {FAMILIES}")
        sizes = ["vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "head_dim",
                 "ffn_hidden_size", "max_position_embeddings"]
        if self.is_moe:
            sizes += ["moe_router_topk", "moe_ffn_hidden_size"]
        for name in sizes + ["num_experts", "shared_expert_size"]:  # the last two may be 0
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name in sizes else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name in sizes else 0}, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            if not isinstance(getattr(self, name), (int, float)) or not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_query_groups {self.num_query_groups}"
            )
        if self.is_moe and self.moe_router_topk > self.num_experts:
            raise ValueError(f"moe_router_topk {self.moe_router_topk} > num_experts {self.num_experts}")
        if self.padding_idx is not None and not 0 <= self.padding_idx < self.vocab_size:
            raise ValueError(f"padding_idx (pad_token_id) {self.padding_idx} outside [0, {self.vocab_size})")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dense_layers {bad} outside [0, {self.num_layers})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        return self

    def check_layout(self, layout) -> None:
        """Clear errors for layouts that do not divide the model."""
        checks = [
            ("num_attention_heads", self.num_attention_heads, layout.tp, "tp"),
            ("num_query_groups", self.num_query_groups, layout.tp, "tp"),
            ("vocab_size", self.vocab_size, layout.tp, "tp"),
            ("num_layers", self.num_layers, layout.pp * layout.vpp, "pp * vpp"),
            ("ffn_hidden_size", self.ffn_hidden_size, layout.tp, "tp"),
        ]
        if self.is_moe:
            checks += [
                ("num_experts", self.num_experts, layout.ep, "ep"),
                ("moe_ffn_hidden_size", self.moe_ffn_hidden_size, layout.expert_tp, "etp"),
            ]
            if self.shared_expert_size:
                checks.append(("shared_expert_size", self.shared_expert_size, layout.tp, "tp"))
        elif layout.ep > 1:
            raise ValueError(f"expert parallelism (ep = {layout.ep}) needs an MoE model; {self.family} is dense")
        for name, value, size, key in checks:
            if value % size:
                raise ValueError(f"{name} = {value} is not divisible by {key} = {size} (layout {layout})")


def transformer_config(
    model: MoEModelConfig, layout, params_dtype: torch.dtype = torch.float32, **overrides
):
    """Megatron TransformerConfig for ``model`` under ``layout``; see module doc for the rules."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    model.validate().check_layout(layout)
    if overrides.get("add_bias_linear") and model.is_moe:
        raise ValueError("add_bias_linear=True is not supported with MoE layers; leave it False")
    if layout.tp > 1 and overrides.get("sequence_parallel") is False and model.is_moe:
        raise ValueError(f"sequence_parallel=False contradicts tp={layout.tp} with MoE: MoELayer requires it")
    te = use_transformer_engine()
    settings = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        sequence_parallel=layout.tp > 1,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        qk_layernorm=model.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        bias_activation_fusion=te,
        bias_dropout_fusion=te,
        masked_softmax_fusion=te,
        apply_rope_fusion=te,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        calculate_per_token_loss=True,
        variable_seq_lengths=layout.pp > 1,
        # Megatron's default (allgather) refuses variable lengths even in dense models.
        moe_token_dispatcher_type="alltoall",
        init_method_std=0.02,
    )
    if model.is_moe:
        settings.update(
            num_moe_experts=model.num_experts,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_router_topk=model.moe_router_topk,
            moe_layer_freq=[0 if i in model.dense_layers else 1 for i in range(model.num_layers)],
            moe_router_pre_softmax=model.router_pre_softmax,
            moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            moe_router_dtype="fp32",
            moe_shared_expert_intermediate_size=model.shared_expert_size or None,
            moe_shared_expert_gate=model.shared_expert_gate,
        )
    unknown = [k for k in overrides if k not in {f.name for f in dataclasses.fields(TransformerConfig)}]
    if unknown:
        raise ValueError(f"unknown TransformerConfig settings: {unknown}")
    settings.update(overrides)
    return TransformerConfig(**settings)


def layer_spec(config, vp_stage: int | None = None):
    """Decoder block spec for this pipeline stage: TE when importable on GPU, else local + CP attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_vespo.mcore.attention import ContextParallelLocalAttention

    use_te = use_transformer_engine()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm",
                                      vp_stage=vp_stage)
    if not use_te:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        for layer in spec.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = ContextParallelLocalAttention
        # With apex installed, gpt_layer_specs.py picks apex's FusedLayerNorm for the final norm
        # (its module-level LNImpl), which refuses RMSNorm; the layers' norms are already torch's.
        spec.layer_norm = WrappedTorchNorm
    return spec


def parameter_device() -> torch.device:
    """Where the model's parameters live: this process's GPU, or the host."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_gpt_model(model: MoEModelConfig, config, vp_stage: int | None = None):
    """The GPTModel chunk of this pipeline rank (``vp_stage``: which virtual chunk, with VPP)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    virtual = config.virtual_pipeline_model_parallel_size is not None
    if virtual and vp_stage is None:
        raise ValueError("with a virtual pipeline, build the chunks with build_gpt_chunks()")
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, vp_stage),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=not virtual, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=not virtual, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rope_theta),
        vp_stage=vp_stage,
    )
    # Megatron creates some parameters on the host whatever the config says (the router's gate,
    # transformer/moe/router.py, moves its .data to the GPU at its first forward, after DDP has
    # hooked the host parameter: its gradient never reached main_grad). Megatron's own get_model
    # (training.py) moves the whole model before wrapping it; so do we.
    gpt.to(parameter_device())
    if gpt.pre_process and model.padding_idx is not None:
        freeze_padding_row(gpt.embedding.word_embeddings, model.padding_idx)
    return gpt


def freeze_padding_row(word_embeddings, padding_idx: int) -> None:
    """Give the embedding lookup transformers' ``padding_idx`` semantics: positions holding
    ``padding_idx`` send no gradient to the embedding table (a tied output layer still does, as
    in transformers). The gradient is dropped at the lookup's output, whose layout depends on
    Megatron's sequence-parallel reduce-scatter: [b, s, h], or [s / tp, b, h] (this TP rank's
    slice of the sequence) with ``reduce_scatter_embeddings``."""

    def keep_mask(input_ids: torch.Tensor) -> torch.Tensor:
        keep = input_ids != padding_idx
        if word_embeddings.reduce_scatter_embeddings:
            tp_size, tp_rank = word_embeddings.tp_group.size(), word_embeddings.tp_group.rank()
            keep = keep.transpose(0, 1).chunk(tp_size, dim=0)[tp_rank]
        return keep.unsqueeze(-1)

    def hook(module, inputs, output):
        if output.requires_grad:
            keep = keep_mask(inputs[0]).to(device=output.device, dtype=output.dtype)
            output.register_hook(lambda grad: grad * keep)

    word_embeddings.register_forward_hook(hook)


def build_gpt_chunks(model: MoEModelConfig, config) -> list:
    """Every model chunk of this pipeline rank: one, or ``vpp`` with a virtual pipeline."""
    vpp = config.virtual_pipeline_model_parallel_size
    if vpp is None:
        return [build_gpt_model(model, config)]
    return [build_gpt_model(model, config, vp_stage=i) for i in range(vpp)]
