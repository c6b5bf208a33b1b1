"""Tiny random Hugging Face models of every supported family, built with transformers on CPU."""

import torch

TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, rms_norm_eps=1e-6, initializer_range=0.1)


def make_hf_model(family: str, directory: str, seed: int = 0, dense_layers: tuple[int, ...] = (0,)) -> None:
    """``dense_layers``: Qwen3-MoE layers with a dense MLP (mlp_only_layers); real SGLang 0.5.23
    builds every Qwen3-MoE layer as MoE, so its tests use none."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**TINY, head_dim=16, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=list(dense_layers),
                                tie_word_embeddings=False)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**TINY, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
                                num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=2,
                                tie_word_embeddings=False)
        model = tf.Qwen2MoeForCausalLM(cfg)
    elif family == "mixtral":
        cfg = tf.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
        model = tf.MixtralForCausalLM(cfg)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=True)
        model = tf.Qwen3ForCausalLM(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(**TINY, tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise ValueError(family)
    model.save_pretrained(directory)
