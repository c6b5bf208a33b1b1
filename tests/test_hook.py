"""The hook on one rank: its gradient is phi * A * grad log pi (autograd on the reference model)."""

import math

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
    pos = sum(1 for s in samples if s.advantage >= 0)
    assert metrics["phi/adv_pos"][1].item() == pos and metrics["phi/adv_neg"][1].item() == len(samples) - pos
    assert metrics["response_tokens"][1].item() == sum(s.response_len for s in samples)
