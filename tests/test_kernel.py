import math

import pytest
import torch
from scipy import integrate

from megatron_vespo import kernel


@pytest.mark.parametrize("adv", [0.7, 0.0, -1.3])
def test_phi_of_one_is_one(adv):
    value = kernel.phi(torch.tensor([0.0]), torch.tensor([adv]))
    assert value.item() == pytest.approx(1.0, abs=1e-12)


def test_phi_matches_plain_formula_and_sign_selects_pair():
    log_w = torch.tensor([-2.0, -0.3, 0.0, 0.4, 1.2, 3.0])
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5, 0.0, -3.0])
    got = kernel.phi(log_w, adv, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0)
    for lw, a, g in zip(log_w.tolist(), adv.tolist(), got.tolist()):
        k, lam = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
        w = math.exp(lw)
        assert g == pytest.approx(w**k * math.exp(lam * (1 - w)), rel=1e-6)


def test_phi_clamps_log_w_and_zeroes_non_finite():
    adv = torch.ones(4)
    log_w = torch.tensor([-100.0, 100.0, float("nan"), float("inf")])
    got = kernel.phi(log_w, adv)
    lo = math.exp(math.log(1e-8)) ** 2 * math.exp(3 * (1 - 1e-8))
    assert got[0].item() == pytest.approx(lo, rel=1e-6)  # clamped at W = 1e-8, not 0
    assert got[1].item() == 0.0  # W = e^20: underflows to 0
    assert got[2].item() == 0.0 and got[3].item() == 0.0
    assert torch.isfinite(got).all()


def test_phi_is_detached_and_checks_shapes():
    log_w = torch.zeros(3, requires_grad=True)
    assert not kernel.phi(log_w, torch.ones(3)).requires_grad
    with pytest.raises(ValueError, match="one value per sequence"):
        kernel.phi(torch.zeros(3), torch.ones(2))


@pytest.mark.parametrize("k,lam", [(2.0, 3.0), (3.0, 2.0), (1.5, 1.0), (4.0, 4.0)])
def test_bounds_against_dense_numeric_search(k, lam):
    w = torch.linspace(1e-6, 30.0, 3_000_001, dtype=torch.float64)
    phi = kernel.phi_of_w(w, k, lam)
    b = kernel.bounds(k, lam)
    i = int(phi.argmax())
    assert b.sup_phi == pytest.approx(phi[i].item(), rel=1e-9)
    assert b.w_star == pytest.approx(w[i].item(), abs=2e-5)
    assert b.k_const == pytest.approx((phi / w).max().item(), rel=1e-6)


def test_paper_constants():
    pos, neg = kernel.bounds(2.0, 3.0), kernel.bounds(3.0, 2.0)
    assert pos.k_const == pytest.approx(2.46, abs=0.01) and pos.sup_phi == pytest.approx(1.21, abs=0.01)
    assert neg.k_const == pytest.approx(1.0, abs=1e-12) and neg.sup_phi == pytest.approx(1.24, abs=0.01)
    assert math.isinf(kernel.bounds(0.5, 1.0).k_const)
    with pytest.raises(ValueError):
        kernel.bounds(0.0, 1.0)


@pytest.mark.parametrize("k,lam", [(2.0, 3.0), (3.0, 2.0)])
def test_surrogate_is_integral_of_phi_over_w(k, lam):
    for w in (0.1, 0.8, 1.0, 2.5, 7.0):
        expected, _ = integrate.quad(lambda x: x ** (k - 1) * math.exp(lam * (1 - x)), 0.0, w)
        assert kernel.surrogate(torch.tensor(w, dtype=torch.float64), k, lam).item() == pytest.approx(expected, rel=1e-9)
    assert kernel.surrogate(torch.tensor(0.0), k, lam).item() == 0.0
    # f'(W) = phi(W) / W by a central difference
    w, h = 1.3, 1e-5
    num = (kernel.surrogate(torch.tensor(w + h, dtype=torch.float64), k, lam) - kernel.surrogate(torch.tensor(w - h, dtype=torch.float64), k, lam)) / (2 * h)
    assert num.item() == pytest.approx(kernel.phi_of_w(torch.tensor(w), k, lam).item() / w, rel=1e-7)
