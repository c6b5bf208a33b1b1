"""The hook on one rank: its gradient is phi * A * grad log pi (autograd on the reference model)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from megatron_vespo.batch import build_micro_batch
from megatron_vespo.hook import HookGroups, loss_from_logits
from megatron_vespo.losses import LossConfig
from megatron_vespo.parity.reference import ReferenceMoE, init_hf_state
from megatron_vespo.parity.worker import make_samples, tiny_model_config


def padded_logits(model, mb):
    rows = []
    for r in range(mb.tokens.shape[0]):
        rows.append(model.forward(mb.tokens[r]))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def setup():
    m = tiny_model_config()
    samples = make_samples(ReferenceMoE(m, init_hf_state(m, 5)), 6, 5)
    return m, samples


def test_hook_gradient_is_phi_times_advantage_times_grad_logpi(setup):
    m, samples = setup
    mb = build_micro_batch(samples, "padded")
    state = {k: v.double().requires_grad_(True) for k, v in init_hf_state(m, 5).items()}
    model = ReferenceMoE(m, state)
    loss, count, _ = loss_from_logits(padded_logits(model, mb), mb, LossConfig(name="vespo"), HookGroups())
    params = list(state.values())
    hook_grads = torch.autograd.grad(loss / count, params, allow_unused=True)

    # Independent: W from the samples, phi by its formula, REINFORCE weight phi * A / N.
    weighted = 0.0
    n_tok = sum(s.response_len for s in samples)
    for s in samples:
        logp = model.response_logprobs(s)
        log_w = float((logp.detach() - s.old_logprobs.double()).clamp(-20, 20).sum())
        w = math.exp(min(max(log_w, math.log(1e-8)), 20.0))
        adv = float(torch.tensor(s.advantage, dtype=torch.float32))  # micro-batches hold fp32
        k, lam = (2.0, 3.0) if adv >= 0 else (3.0, 2.0)
        phi = w**k * math.exp(lam * (1 - w))
        weighted = weighted - phi * adv * logp.sum() / n_tok
    expected = torch.autograd.grad(weighted, params, allow_unused=True)
    assert int(count) == n_tok
    compared = 0
    for name, got, want in zip(state, hook_grads, expected):
        if want is None:
            assert got is None or got.abs().max() == 0, name
            continue
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda text: f"{name}: {text}")
        compared += 1
    assert compared > 10


def test_hook_rejects_bad_logits(setup):
    m, samples = setup
    mb = build_micro_batch(samples[:2], "padded")
    logits = torch.zeros(*mb.tokens.shape, m.vocab_size)
    with pytest.raises(ValueError, match="batch/sequence shape"):
        loss_from_logits(logits[:, :-1], mb, LossConfig(), HookGroups())
    logits[0, mb.loss_mask[0].nonzero()[0, 0]] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite log-probs"):
        loss_from_logits(logits, mb, LossConfig(), HookGroups())


def test_hook_metrics_are_sums_and_counts(setup):
    m, samples = setup
    mb = build_micro_batch(samples, "packed")
    logits = torch.randn(*mb.tokens.shape, m.vocab_size)
    loss, count, metrics = loss_from_logits(logits, mb, LossConfig(name="vespo"), HookGroups())
    assert metrics["policy_loss"].tolist() == pytest.approx([loss.item(), float(count)])
    assert metrics["sequences"].tolist() == [len(samples), len(samples)]
    pos = sum(1 for s in samples if s.advantage > 0)
    assert metrics["phi/adv_pos"][1].item() == pos and metrics["phi/adv_neg"][1].item() == len(samples) - pos
    assert metrics["response_tokens"][1].item() == sum(s.response_len for s in samples)


@pytest.fixture
def single_stage(monkeypatch):
    """reduce_metrics as on one rank of one pipeline stage (no process groups needed)."""
    from megatron.core import parallel_state as ps

    monkeypatch.setattr(ps, "is_pipeline_last_stage", lambda *a, **k: True)
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_group", lambda *a, **k: None)
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_world_size", lambda *a, **k: 1)
    monkeypatch.setattr(ps, "get_data_parallel_group", lambda *a, **k: None)


def test_step_metrics_follow_the_reference_definitions(setup, single_stage):
    """Over two micro-batches: the paper's reference metrics (A = 0 in neither sign; extremes,
    the unbiased std of W, the W > 100 fraction of A < 0 sequences, approx_kl), computed here
    independently from the samples."""
    from megatron_vespo.hook import reduce_metrics

    m, base = setup
    model = ReferenceMoE(m, init_hf_state(m, 5))
    samples = []
    for i, s in enumerate(base):
        s = dataclasses.replace(s)
        s.advantage = [0.0, 0.7, -0.4, -1.1, 0.0, 1.3][i]
        if i == 3:  # W far above 100 for a negative-advantage sequence
            s.old_logprobs = model.response_logprobs(s).float() - 6.0 / s.response_len
        samples.append(s)
    cfg = LossConfig(name="vespo")
    parts = [samples[:3], samples[3:]]
    reduced = reduce_metrics([loss_from_logits(padded_logits(model, build_micro_batch(p, "padded")),
                                               build_micro_batch(p, "padded"), cfg, HookGroups())[2] for p in parts])

    log_w, phi, adv, kl = [], [], [], []
    for s in samples:
        logp = model.response_logprobs(s).double()
        ratio = (logp - s.old_logprobs.double()).clamp(-20, 20)
        value = min(max(float(ratio.sum()), math.log(1e-8)), 20.0)
        a = float(torch.tensor(s.advantage, dtype=torch.float32))
        k, lam = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
        w = math.exp(value)
        log_w.append(value), phi.append(w**k * math.exp(lam * (1 - w))), adv.append(a)
        kl.append(-float(ratio.sum()) / s.response_len)
    w = np.exp(log_w)
    pos, neg = np.array(adv) > 0, np.array(adv) < 0
    expected = {"w_seq/max": w.max(), "w_seq/min": w.min(), "w_seq/std": w.std(ddof=1), "w_seq": w.mean(),
                "log_w/max": max(log_w), "log_w/min": min(log_w), "phi/max": max(phi), "phi/min": min(phi),
                "phi/adv_pos": np.array(phi)[pos].mean(), "phi/adv_neg": np.array(phi)[neg].mean(),
                "w_seq/adv_pos": w[pos].mean(), "w_seq/adv_neg": w[neg].mean(),
                "sequences/adv_pos": 2, "sequences/adv_neg": 2, "sequences": 6,
                "w_seq/adv_neg_over_100": 0.5, "approx_kl": np.mean(kl)}
    assert w[3] > 100 and pos.sum() + neg.sum() == 4
    for name, value in expected.items():
        assert reduced[name] == pytest.approx(value, rel=1e-5), name
