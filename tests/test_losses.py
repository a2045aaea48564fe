"""The losses of docs/method.md against autograd and closed forms."""
import math

import pytest
import torch

from cwdpo import losses as L

torch.manual_seed(0)


def _inputs(b=6, requires_grad=True):
    g = torch.Generator().manual_seed(1)
    t = lambda: (torch.randn(b, generator=g, dtype=torch.float64) * 5 - 20).requires_grad_(requires_grad)  # noqa: E731
    return t(), t(), t().detach(), t().detach()


def test_dpo_closed_form():
    pc, pr, rc, rr = _inputs()
    losses, info = L.dpo_loss(pc, pr, rc, rr, beta=0.1)
    m = 0.1 * ((pc - rc) - (pr - rr))
    torch.testing.assert_close(losses, torch.log1p(torch.exp(-m)))
    torch.testing.assert_close(info["margins"], m.detach())
    assert torch.equal(info["accuracies"], (m > 0).double().float())
    assert not info["chosen_rewards"].requires_grad


def test_all_losses_pass_gradcheck():
    pc, pr, rc, rr = _inputs(4)
    avg = torch.randn(4, dtype=torch.float64) - 4
    assert torch.autograd.gradcheck(lambda a, b: L.dpo_loss(a, b, rc, rr, beta=0.3)[0], (pc, pr))
    assert torch.autograd.gradcheck(lambda a, b: L.focal_dpo_loss(a, b, rc, rr, beta=0.3, gamma=2.0)[0], (pc, pr))
    assert torch.autograd.gradcheck(
        lambda a, b: L.cw_dpo_loss(a, b, rc, rr, avg, beta=0.3, l_floor=-5, tau=1.0)[0], (pc, pr))
    pos = torch.rand(5, dtype=torch.float64, requires_grad=True)
    neg = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: L.sft_c_loss(a, b, margin=2.0, lam=0.7)[0], (pos, neg))


def test_cw_dpo_with_unit_weight_equals_dpo_values_and_gradients():
    pc, pr, rc, rr = _inputs()
    avg = torch.full((6,), -1.0, dtype=torch.float64)
    cw, info = L.cw_dpo_loss(pc, pr, rc, rr, avg, beta=0.1, l_floor=-1e9, tau=1.0)  # w_c = σ(huge) = 1
    assert torch.all(info["w_c"] == 1.0)
    dpo, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(cw, dpo, rtol=0, atol=0)
    g_cw = torch.autograd.grad(cw.sum(), (pc, pr))
    g_dpo = torch.autograd.grad(dpo.sum(), (pc, pr))
    for a, b in zip(g_cw, g_dpo):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cw_dpo_loser_gradient_is_w_c_times_dpo_gradient_at_the_same_margin():
    pc, pr, rc, rr = _inputs()
    avg = torch.tensor([-9.0, -6.0, -5.0, -4.0, -2.0, -0.5], dtype=torch.float64)
    beta = 0.2
    cw, info = L.cw_dpo_loss(pc, pr, rc, rr, avg, beta=beta, l_floor=-5.0, tau=1.0)
    g_pr, g_pc = torch.autograd.grad(cw.sum(), (pr, pc))
    w = info["w_c"]
    m = info["margins"]
    # DPO at margin m: L = softplus(-m) with dm/dpr = -β, so dL/dpr = β σ(-m); CW-DPO's is w_c times that
    torch.testing.assert_close(g_pr, w * beta * torch.sigmoid(-m))
    torch.testing.assert_close(g_pc, -beta * torch.sigmoid(-m))  # the winner term is not cooled
    # the same through DPO's own autograd: give DPO a loser difference of w_c·Δ_l (same margin)
    pr2 = (rr + w * (pr.detach() - rr)).requires_grad_(True)
    dpo, dinfo = L.dpo_loss(pc.detach(), pr2, rc, rr, beta=beta)
    torch.testing.assert_close(dinfo["margins"], m)
    (g_dpo,) = torch.autograd.grad(dpo.sum(), (pr2,))
    torch.testing.assert_close(g_pr, w * g_dpo)


def test_cooling_weight_limits_formula_and_detached():
    avg = torch.tensor([-50.0, -5.0, 0.0, 30.0], requires_grad=True)
    w = L.cooling_weight(avg, l_floor=-5.0, tau=1.0)
    assert not w.requires_grad
    assert w[0] < 1e-15 and w[3] > 1 - 1e-6
    assert w[1] == pytest.approx(0.5)
    assert w[2] == pytest.approx(1 / (1 + math.exp(-5.0)))
    assert L.cooling_weight(torch.tensor([-7.0]), l_floor=-5.0, tau=2.0)[0] == pytest.approx(1 / (1 + math.e))
    # no gradient reaches ℓ̄ through w_c in the loss
    pc, pr, rc, rr = _inputs(4)
    a = torch.tensor([-6.0, -5.0, -4.0, -3.0], dtype=torch.float64, requires_grad=True)
    loss, _ = L.cw_dpo_loss(pc, pr, rc, rr, a, beta=0.1, l_floor=-5.0, tau=1.0)
    (g,) = torch.autograd.grad(loss.sum(), (a,), allow_unused=True)
    assert g is None
    with pytest.raises(ValueError):
        L.cooling_weight(avg, l_floor=0, tau=0)


def test_focal_dpo_gamma_zero_is_dpo_and_closed_form():
    pc, pr, rc, rr = _inputs()
    f0, _ = L.focal_dpo_loss(pc, pr, rc, rr, beta=0.1, gamma=0.0)
    d, info = L.dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(f0, d, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(f0.sum(), pr)[0], torch.autograd.grad(d.sum(), pr)[0])
    f2, finfo = L.focal_dpo_loss(pc, pr, rc, rr, beta=0.1, gamma=2.0)
    p = torch.sigmoid(info["margins"])
    torch.testing.assert_close(f2.detach(), -((1 - p) ** 2) * torch.log(p))
    assert torch.all(f2 <= d + 1e-12)  # the modulation only down-weights


def test_sft_c_penalty_and_gradient():
    pos = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    neg = torch.tensor([2.5, 3.5], dtype=torch.float64, requires_grad=True)  # mean 3.0
    loss, info = L.sft_c_loss(pos, neg, margin=2.0, lam=0.7)  # mean NLL(y-) >= C: inactive
    assert info["penalty"] == 0 and info["active"] == 0
    assert loss.item() == pytest.approx(1.5)
    (g_neg,) = torch.autograd.grad(loss, (neg,))
    assert torch.all(g_neg == 0)
    loss, info = L.sft_c_loss(pos, neg, margin=4.0, lam=0.7)  # active: λ·(C − mean) = 0.7
    assert info["penalty"].item() == pytest.approx(0.7) and info["active"] == 1
    assert loss.item() == pytest.approx(1.5 + 0.7)
    g_pos, g_neg = torch.autograd.grad(loss, (pos, neg))
    torch.testing.assert_close(g_neg, torch.full((2,), -0.7 / 2, dtype=torch.float64))
    torch.testing.assert_close(g_pos, torch.full((2,), 0.5, dtype=torch.float64))
    sft, _ = L.sft_loss(pos)
    assert sft.item() == pytest.approx(1.5)


def test_negative_filter():
    keep = L.negative_filter_keep(torch.tensor([-7.5, -7.0, -6.9, -2.0]), l_floor=-5.0, tau=1.0, k=2.0)
    assert keep.tolist() == [False, True, True, True]
