"""Each loss against an independent plain formula (value and gradient w.r.t. log pi_theta)."""

import math

import pytest
import torch

from megatron_vespo import losses
from megatron_vespo.hook import sequence_statistics
from megatron_vespo.losses import LossConfig, TokenBatch

LENGTHS = [3, 1, 4, 2, 5]
ADV = [0.8, -1.2, 0.0, -0.3, 1.5]


def make_tokens(seed=0, noise=0.3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    logp = (-torch.rand(n, generator=gen, dtype=dtype) * 4 - 0.05).requires_grad_(True)
    old = (logp.detach() + noise * torch.randn(n, generator=gen, dtype=dtype)).clamp(max=0)
    engine = (old + 0.2 * torch.randn(n, generator=gen, dtype=dtype)).clamp(max=0)
    seq_index = torch.cat([torch.full((n_,), i) for i, n_ in enumerate(LENGTHS)])
    return logp, old, engine, seq_index


def ours(cfg: LossConfig, logp, old, engine, seq_index, adv=ADV):
    if cfg.bypass:
        old, engine = engine, None
    tokens = TokenBatch(logp, old, engine, torch.ones_like(logp), seq_index)
    stats = sequence_statistics(tokens, torch.tensor(adv, dtype=logp.dtype), len(adv), cfg, None)
    out, weights, _ = losses.compute_loss(stats, tokens, cfg)
    total, count = losses.aggregate(out.per_token_loss, weights, tokens, stats, cfg.aggregation, True)
    return total / count


def seqs(x, seq_index):
    return [x[seq_index == i] for i in range(len(LENGTHS))]


def plain(name, cfg, logp, old, engine, seq_index):
    """Independent formulas, written per sequence and per token."""
    n_tok = logp.numel()
    lp, ol, en = seqs(logp, seq_index), seqs(old, seq_index), seqs(engine, seq_index)
    total = 0.0
    for i, a in enumerate(ADV):
        lr = (lp[i] - ol[i]).clamp(-20, 20)
        if name == "vespo":
            log_w = lr.detach().sum()
            if cfg.correction == "fold":
                log_w = log_w + (ol[i] - en[i]).clamp(-20, 20).sum()
            w = math.exp(min(max(float(log_w), math.log(1e-8)), 20.0))
            k, lam = (cfg.k_pos, cfg.lambda_pos) if a >= 0 else (cfg.k_neg, cfg.lambda_neg)
            phi = w**k * math.exp(lam * (1 - w))
            total = total + (-phi * a * lp[i]).sum()
        elif name == "grpo":
            for t in range(len(lr)):
                r = torch.exp(lr[t])
                term = torch.maximum(-a * r, -a * r.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high))
                if a < 0 and float(term.detach()) > -a * cfg.dual_clip_c:
                    term = torch.tensor(-a * cfg.dual_clip_c, dtype=lr.dtype)
                total = total + term
        elif name == "gspo":
            s = torch.exp(lr.mean())
            j = torch.maximum(-a * s, -a * s.clamp(1 - cfg.gspo_eps_low, 1 + cfg.gspo_eps_high))
            total = total + len(lr) * j
        elif name == "sapo":
            tau = cfg.sapo_tau_pos if a > 0 else cfg.sapo_tau_neg
            total = total + (-a * torch.sigmoid(tau * (lr.exp() - 1)) * 4 / tau).sum()
        elif name == "cispo":
            weight = lr.detach().exp().clamp(max(0, 1 - cfg.cispo_eps_low), 1 + cfg.cispo_eps_high)
            total = total + (-weight * a * lp[i]).sum()
        elif name == "gmpo":
            c = lr.clamp(-cfg.gmpo_log_clip, cfg.gmpo_log_clip)
            ell = torch.minimum(lr, c) if a >= 0 else torch.maximum(lr, c)
            total = total + len(lr) * (-a * torch.exp(ell.mean()))
    return total / n_tok


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
@pytest.mark.parametrize("noise", [0.3, 1e-5])
def test_loss_value_and_gradient_match_plain_formula(name, noise):
    logp, old, engine, seq_index = make_tokens(noise=noise)
    cfg = LossConfig(name=name).validate()
    got = ours(cfg, logp, old, engine, seq_index)
    (g_ours,) = torch.autograd.grad(got, logp)
    want = plain(name, cfg, logp, old, engine, seq_index)
    (g_plain,) = torch.autograd.grad(want, logp)
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(g_ours, g_plain, rtol=1e-9, atol=1e-12)
    assert g_ours.abs().sum() > 0  # the test must be able to see a gradient


def test_vespo_fold_adds_the_mismatch_to_w():
    logp, old, engine, seq_index = make_tokens()
    cfg = LossConfig(name="vespo", correction="fold").validate()
    got = ours(cfg, logp, old, engine, seq_index)
    assert got.item() == pytest.approx(plain("vespo", cfg, logp, old, engine, seq_index).item(), rel=1e-10)
    assert got.item() != pytest.approx(ours(LossConfig(name="vespo"), logp, old, engine, seq_index).item(), rel=1e-6)


def test_bypass_uses_engine_logprobs_as_pi_old():
    logp, old, engine, seq_index = make_tokens()
    bypass = ours(LossConfig(name="grpo", bypass=True), logp, old, engine, seq_index)
    direct = ours(LossConfig(name="grpo"), logp, engine, None, seq_index)
    assert bypass.item() == pytest.approx(direct.item(), rel=1e-12)


@pytest.mark.parametrize("correction", ["tis", "mis"])
def test_token_corrections(correction):
    logp, old, engine, seq_index = make_tokens()
    cfg = LossConfig(name="cispo", correction=correction, tis_cap=1.1, mis_low=0.9, mis_high=1.1).validate()
    got = ours(cfg, logp, old, engine, seq_index)
    ratio = (old - engine).exp()
    weight = ratio.clamp(max=1.1) if correction == "tis" else ((ratio >= 0.9) & (ratio <= 1.1)).double()
    lr = (logp - old).detach()
    adv = torch.tensor(ADV, dtype=torch.float64)[seq_index]
    want = (-lr.exp().clamp(0, 1.28) * adv * logp * weight).sum() / logp.numel()
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    bites = (ratio > 1.1) if correction == "tis" else (weight == 0)
    assert 0 < float(bites.double().mean()) < 1  # the correction really bites here


def test_aggregations():
    logp, old, engine, seq_index = make_tokens()
    per_token = {}
    for agg in losses.AGGREGATIONS:
        per_token[agg] = ours(LossConfig(name="vespo", aggregation=agg), logp, old, engine, seq_index).item()
    tokens = TokenBatch(logp, old, engine, torch.ones_like(logp), seq_index)
    stats = sequence_statistics(tokens, torch.tensor(ADV, dtype=torch.float64), 5, LossConfig(), None)
    out = losses.vespo_loss(stats, tokens, LossConfig())
    per_seq = [x for x in seqs(out.per_token_loss.detach(), seq_index)]
    assert per_token["token_mean"] == pytest.approx(sum(x.sum() for x in per_seq).item() / logp.numel())
    assert per_token["seq_mean_token_mean"] == pytest.approx(sum(x.mean() for x in per_seq).item() / 5)
    assert per_token["seq_mean_token_sum"] == pytest.approx(sum(x.sum() for x in per_seq).item() / 5)
    assert per_token["legacy_microbatch_token_mean"] == pytest.approx(per_token["token_mean"])


def test_legacy_mode_averages_micro_batch_means():
    """Two micro-batches of different token counts: legacy = mean of the two token means."""
    logp, old, engine, seq_index = make_tokens()
    cfg = LossConfig(name="vespo", aggregation="legacy_microbatch_token_mean").validate()
    sums, counts, means = 0.0, 0.0, []
    for ids in ([0, 1], [2, 3, 4]):
        sel = torch.isin(seq_index, torch.tensor(ids))
        idx = torch.searchsorted(torch.tensor(ids), seq_index[sel])
        tokens = TokenBatch(logp[sel], old[sel], engine[sel], torch.ones(int(sel.sum()), dtype=torch.float64), idx)
        adv = torch.tensor([ADV[i] for i in ids], dtype=torch.float64)
        stats = sequence_statistics(tokens, adv, len(ids), cfg, None)
        out, w, _ = losses.compute_loss(stats, tokens, cfg)
        s, c = losses.aggregate(out.per_token_loss, w, tokens, stats, cfg.aggregation, True)
        sums, counts = sums + s.item(), counts + c.item()
        means.append((out.per_token_loss.detach().sum() / sel.sum()).item())
    assert counts == 2
    assert sums / counts == pytest.approx(sum(means) / 2)


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="unknown loss 'ppo'"):
        LossConfig(name="ppo").validate()
    with pytest.raises(ValueError, match="only defined for vespo"):
        LossConfig(name="grpo", correction="fold").validate()
    with pytest.raises(ValueError, match="unknown aggregation"):
        LossConfig(aggregation="mean").validate()
    with pytest.raises(ValueError, match="temperature"):
        LossConfig(temperature=0).validate()
    logp, old, _, seq_index = make_tokens()
    with pytest.raises(ValueError, match="engine's per-token log-probs"):
        ours(LossConfig(name="grpo", correction="tis"), logp, old, None, seq_index)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_and_their_gradients(estimator):
    """k1 = rho, k2 = rho^2 / 2, k3 = exp(-rho) - 1 + rho (rho = log pi - log ref); each is >= 0 in
    expectation and k2, k3 >= 0 per token; gradients by autograd of the plain formulas."""
    gen = torch.Generator().manual_seed(0)
    logp = (-torch.rand(9, generator=gen, dtype=torch.float64)).requires_grad_(True)
    ref = -torch.rand(9, generator=gen, dtype=torch.float64)
    rho = logp - ref
    plain = {"k1": rho, "k2": 0.5 * rho ** 2, "k3": torch.exp(-rho) - 1 + rho}[estimator]
    got = losses.per_token_kl(logp, ref, estimator)
    torch.testing.assert_close(got, plain)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), logp)[0], torch.autograd.grad(plain.sum(), logp)[0])
    if estimator != "k1":
        assert (got >= 0).all()
    with pytest.raises(ValueError, match="unknown kl_estimator 'k4'"):
        losses.per_token_kl(logp, ref, "k4")


def test_regularizer_needs_its_inputs_and_untrained_sequences_are_not_counted():
    tokens = TokenBatch(logp=torch.tensor([-1.0, -2.0, -0.5], requires_grad=True), old_logp=torch.zeros(3),
                        engine_logp=None, mask=torch.tensor([1.0, 1.0, 0.0]), seq_index=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="needs the reference policy's per-token log-probs"):
        losses.regularizer(tokens, None, LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="needs the token entropy with its gradient"):
        losses.regularizer(tokens, torch.ones(3), LossConfig(entropy_coef=0.1))
    assert losses.regularizer(tokens, None, LossConfig()) == (None, {})
    entropy = torch.tensor([0.3, 0.2, 0.9], requires_grad=True)
    term, _ = losses.regularizer(tokens, entropy, LossConfig(entropy_coef=0.5))
    torch.testing.assert_close(term, -0.5 * entropy)
    # sequence 1 has no token in the loss: not a sequence of the normaliser, and a micro-batch
    # with nothing trained is no mean of its own under the legacy aggregation
    stats = sequence_statistics(tokens, torch.tensor([1.0, -1.0]), 2, LossConfig(), None)
    assert stats.token_count.tolist() == [2.0, 0.0]
    _, n_seq = losses.aggregate(torch.ones(3), torch.ones(3), tokens, stats, "seq_mean_token_sum", True)
    assert float(n_seq) == 1.0
    nothing = TokenBatch(tokens.logp, tokens.old_logp, None, torch.zeros(3), tokens.seq_index)
    empty = sequence_statistics(nothing, torch.tensor([1.0, -1.0]), 2, LossConfig(), None)
    total, normaliser = losses.aggregate(torch.ones(3), torch.ones(3), nothing, empty, "legacy_microbatch_token_mean", True)
    assert float(total) == 0.0 and float(normaliser) == 0.0
