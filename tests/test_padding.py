"""Degenerate embedding rows and transformers' padding_idx: the warning, the frozen row (as
transformers trains it) and the demo model, whose every token has a real embedding."""

import warnings

import pytest
import torch

from megatron_vespo.convert.families import load_hf_config, model_config_from_hf
from megatron_vespo.mcore.weights import (DegenerateEmbeddingWarning, SafetensorsSource, check_embedding_rows,
                                          degenerate_embedding_rows, hf_names)
from megatron_vespo.parity.reference import ReferenceMoE
from megatron_vespo.parity.trainer_path import PAD, model_config, write_hf_model


@pytest.fixture(scope="module")
def padded_model(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("padded") / "model")
    write_hf_model(directory, model_config())
    return directory


def test_padding_idx_is_read_from_pad_token_id(padded_model):
    m = model_config_from_hf(load_hf_config(padded_model))
    assert m.padding_idx == PAD
    assert model_config_from_hf({**load_hf_config(padded_model), "pad_token_id": -1}).padding_idx == m.vocab_size - 1
    with pytest.raises(ValueError, match="padding_idx .pad_token_id. 999 outside"):
        model_config_from_hf({**load_hf_config(padded_model), "pad_token_id": 999})


def _hf_and_reference_embedding_grads(directory, padding_idx):
    import transformers as tf

    tokens = torch.tensor([7, 9, 11, PAD, 13, 15, PAD, 17])
    hf = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, experts_implementation="eager")
    logp = torch.log_softmax(hf(tokens.unsqueeze(0)).logits[0], -1)
    (-logp[torch.arange(7), tokens[1:]].sum()).backward()
    hf_grad = hf.model.embed_tokens.weight.grad

    m = model_config_from_hf(load_hf_config(directory))
    m.padding_idx = padding_idx
    source = SafetensorsSource(directory)
    state = {name: source.read(name).double().requires_grad_(True) for name in hf_names(m)}
    logp = torch.log_softmax(ReferenceMoE(m, state).forward(tokens), -1)
    (-logp[torch.arange(7), tokens[1:]].sum()).backward()
    return hf_grad, state["model.embed_tokens.weight"].grad


def test_the_reference_freezes_the_padding_row_as_transformers_does(padded_model):
    hf_grad, ref_grad = _hf_and_reference_embedding_grads(padded_model, PAD)
    assert hf_grad[PAD].abs().max() == 0  # transformers: nn.Embedding(padding_idx)
    assert ref_grad[PAD].abs().max() == 0
    # transformers' RMSNorm computes in fp32 even for an fp64 model: agreement to ~1e-5
    torch.testing.assert_close(ref_grad, hf_grad, rtol=1e-4, atol=1e-5)
    # without the freeze, the row PAD is read at positions 3 and 6 and gets a gradient
    _, unfrozen = _hf_and_reference_embedding_grads(padded_model, None)
    assert unfrozen[PAD].norm() > 1e-3 * unfrozen.norm()


def test_degenerate_rows_are_named_in_a_warning(tmp_path):
    embedding = torch.randn(16, 8)
    embedding[0] = 0.0
    embedding[5] *= 1e-3
    assert degenerate_embedding_rows(embedding) == [0, 5]
    m = model_config()
    source = type("Source", (), {"read": lambda self, name: embedding})()
    logged = []
    with pytest.warns(DegenerateEmbeddingWarning, match=r"2 token\(s\) .* \(ids 0, 5;"):
        assert check_embedding_rows(source, m, warn=logged.append) == [0, 5]
    assert logged and "gradient spike" in logged[0]
    healthy = type("Source", (), {"read": lambda self, name: torch.randn(16, 8) + 0.1})()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_embedding_rows(healthy, m) == []


def test_transformers_zero_padding_row_is_flagged(tmp_path):
    """A freshly initialised transformers model with a pad_token_id starts that row at zero."""
    import transformers as tf

    from tests.hf_models import TINY

    cfg = tf.Qwen3MoeConfig(**TINY, head_dim=16, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                            norm_topk_prob=True, pad_token_id=6, tie_word_embeddings=False)
    tf.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path)
    m = model_config_from_hf(load_hf_config(str(tmp_path)))
    with pytest.warns(DegenerateEmbeddingWarning, match=r"ids 6;.*Row 6 is pad_token_id: frozen"):
        check_embedding_rows(SafetensorsSource(str(tmp_path)), m)


@pytest.mark.slow
def test_the_demo_model_embeds_every_token(tmp_path):
    from megatron_vespo.train.demo import build_model

    directory = build_model(str(tmp_path / "demo"), "reverse", log=lambda message: None, digits=(2, 4))
    config = load_hf_config(directory)
    assert config.get("pad_token_id") is None and not config.get("mlp_only_layers")
    assert degenerate_embedding_rows(SafetensorsSource(directory).read("model.embed_tokens.weight")) == []
