"""Hand computations and limits for dpo_variants.py, the arithmetic in each docstring.

Worked inputs as in test_family.py: policy -10 / -15, reference -11 / -14, beta 0.1, so the
log-ratios are c = 1, r = -1 and Delta = 2.
"""

import math

import pytest
import torch

from preftune.core.losses import ALIASES, LOSSES
from preftune.core.losses.dpo import cdpo_loss, sigmoid_dpo_loss
from preftune.core.losses.dpo_variants import (
    F_DIVERGENCES,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    discopop_loss,
    dpop_loss,
    exo_pair_loss,
    f_dpo_loss,
    nca_pair_loss,
    sppo_hard_loss,
)

T = torch.tensor
PC, PR, RC, RR = T([-10.0]), T([-15.0]), T([-11.0]), T([-14.0])  # c = 1, r = -1, Delta = 2


def _random(n=8, seed=0, spread=3.0):
    """Reference log-probs in [-60, 0] and policies within +-spread of them."""
    g = torch.Generator().manual_seed(seed)
    rc, rr = (-60 * torch.rand(n, generator=g) for _ in range(2))
    pc, pr = (ref + spread * (2 * torch.rand(n, generator=g) - 1) for ref in (rc, rr))
    return pc, pr, rc, rr


def _item(out):
    return out.losses.item()


# ---- EXO ----

def test_exo_pair_worked_example():
    """q = (sigmoid(0.2), sigmoid(-0.2)) = (0.549834, 0.450166), p = (0.999, 0.001):
    0.549834 (log 0.549834 - log 0.999) + 0.450166 (log 0.450166 - log 0.001)
    = 0.549834 (-0.598139 + 0.001001) + 0.450166 (-0.798139 + 6.907755) = -0.328322 + 2.750337 = 2.422015."""
    assert _item(exo_pair_loss(PC, PR, RC, RR, beta=0.1, exo_epsilon=1e-3)) == pytest.approx(2.422015, abs=1e-6)


def test_exo_pair_is_zero_with_zero_gradient_where_the_policy_matches_the_labels():
    """KL(q || p) = 0 iff q = p: sigmoid(beta Delta) = 1 - eps, i.e. beta Delta = log((1 - eps)/eps)
    = log 9 = 2.197225 for eps 0.1, beta 1; at Delta = 0 it is KL((.5, .5) || (.9, .1))
    = 0.5 log(0.5/0.9) + 0.5 log(0.5/0.1) = -0.293893 + 0.804719 = 0.510826."""
    pc = T([math.log(9.0)], requires_grad=True)
    out = exo_pair_loss(pc, T([0.0]), T([0.0]), T([0.0]), beta=1.0, exo_epsilon=0.1)
    assert out.losses.item() == pytest.approx(0.0, abs=1e-6)
    out.losses.sum().backward()
    assert pc.grad.item() == pytest.approx(0.0, abs=1e-6)
    level = exo_pair_loss(T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=1.0, exo_epsilon=0.1)
    assert _item(level) == pytest.approx(0.510826, abs=1e-6)


# ---- NCA ----

def test_nca_pair_worked_example():
    """-log sigmoid(0.1) - 0.5 log sigmoid(-0.1) - 0.5 log sigmoid(0.1)   [beta r = -0.1]
    = 0.644397 + 0.5 * 0.744397 + 0.5 * 0.644397 = 0.644397 + 0.372198 + 0.322198 = 1.338793."""
    assert _item(nca_pair_loss(PC, PR, RC, RR, beta=0.1)) == pytest.approx(1.338793, abs=1e-6)


def test_nca_pair_holds_the_chosen_reward_at_log_2_whatever_the_rejected_does():
    """d/dc [-log sig(bc) - 0.5 log sig(-bc)] = b (-(1 - sig(bc)) + 0.5 sig(bc)) = 0 at sig = 2/3,
    i.e. beta c = log 2; below it the chosen log-prob is pushed up. The rejected one is always pushed down."""
    for r in (-30.0, 0.0, 12.0):
        pc, pr = T([math.log(2.0) / 0.1], requires_grad=True), T([r], requires_grad=True)
        nca_pair_loss(pc, pr, T([0.0]), T([0.0]), beta=0.1).losses.sum().backward()
        assert pc.grad.item() == pytest.approx(0.0, abs=1e-7)
        assert pr.grad.item() > 0
    below = T([0.0], requires_grad=True)
    nca_pair_loss(below, T([0.0]), T([0.0]), T([0.0]), beta=0.1).losses.sum().backward()
    assert below.grad.item() < 0


# ---- SPPO ----

def test_sppo_hard_worked_example_and_its_targets():
    """(1 - 1/(2*0.1))^2 + (-1 + 5)^2 = 16 + 16 = 32; zero at c = +5, r = -5 (each side its own target)."""
    assert _item(sppo_hard_loss(PC, PR, RC, RR, beta=0.1)) == pytest.approx(32.0)
    assert _item(sppo_hard_loss(T([-6.0]), T([-19.0]), T([-11.0]), T([-14.0]), beta=0.1)) == pytest.approx(0.0)
    # a margin of 10 split unevenly is not enough: (7 - 5)^2 + (-3 + 5)^2 = 8
    assert _item(sppo_hard_loss(T([7.0]), T([-3.0]), T([0.0]), T([0.0]), beta=0.1)) == pytest.approx(8.0)


# ---- AOT ----

def test_aot_on_one_pair_is_cdpo():
    """No sorting with one pair: delta = Delta = 2, and eps 0.1 gives cDPO's 0.618139."""
    for fn in (aot_loss, aot_unpaired_loss):
        assert _item(fn(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)) == pytest.approx(0.618139, abs=1e-6)


def test_aot_compares_sorted_margins_not_pairs():
    """Policy margins pi_c - pi_r = [1, 3], reference margins ref_c - ref_r = [2, 0]: pair by pair
    Delta = [-1, 3], but sorted [1, 3] - [0, 2] = [1, 1]; beta 1, eps 0: both -log sigmoid(1) = 0.313262
    (DPO per pair would be 1.313262 and 0.048587)."""
    out = aot_loss(T([-1.0, -3.0]), T([-2.0, -6.0]), T([-2.0, -5.0]), T([-4.0, -5.0]), beta=1.0, label_smoothing=0.0)
    assert out.losses.tolist() == pytest.approx([0.313262, 0.313262], abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([1.0, 2.0])  # rewards stay per pair: c = [1, 2]


def test_aot_unpaired_sorts_chosen_and_rejected_apart():
    """c = [2, -1], r = [0, 1] (pairwise Delta = [2, -2]); sorted c = [-1, 2], sorted r = [0, 1]:
    delta = [-1, 1]; beta 1, eps 0: [-log sigmoid(-1), -log sigmoid(1)] = [1.313262, 0.313262]."""
    out = aot_unpaired_loss(T([2.0, -1.0]), T([0.0, 1.0]), T([0.0, 0.0]), T([0.0, 0.0]), beta=1.0, label_smoothing=0.0)
    assert out.losses.tolist() == pytest.approx([1.313262, 0.313262], abs=1e-6)


def test_aot_with_agreeing_orders_is_cdpo_and_any_batch_order_gives_the_same_mean():
    """Sort a batch so that policy and reference margins are both ascending: then the k-th
    quantiles belong to the same pair and AOT is cDPO pair by pair. Shuffling the pairs changes
    nothing (the loss is a function of the batch's distribution)."""
    pc, pr, rc, rr = _random(seed=1)
    order = torch.argsort(pc - pr)
    pc, pr = pc[order], pr[order]
    rr = rc - torch.sort(rc - rr).values  # reference margins ascending, too
    ours = aot_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1).losses
    assert torch.allclose(ours, cdpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1).losses, atol=1e-6)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    for fn in (aot_loss, aot_unpaired_loss):
        a = fn(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1).losses.mean()
        b = fn(pc[perm], pr[perm], rc[perm], rr[perm], beta=0.1, label_smoothing=0.1).losses.mean()
        assert a.item() == pytest.approx(b.item(), abs=1e-7)


def test_aot_pair_is_trls_earlier_name_for_aot_unpaired():
    assert ALIASES["aot_pair"] == "aot_unpaired" and "aot_pair" not in LOSSES


# ---- APO ----

def test_apo_zero_worked_example_and_its_direction():
    """1 - sigmoid(0.1) + sigmoid(-0.1) = 2 * (1 - 0.524979) = 0.950042. Anchored: on any input the
    chosen log-prob is pushed up (d/dpi_c < 0) and the rejected one down (d/dpi_r > 0)."""
    assert _item(apo_zero_loss(PC, PR, RC, RR, beta=0.1)) == pytest.approx(0.950042, abs=1e-6)
    pc, pr, rc, rr = _random(seed=3, spread=40.0)
    pc.requires_grad_(), pr.requires_grad_()
    apo_zero_loss(pc, pr, rc, rr, beta=0.1).losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_apo_down_worked_example_and_its_gradient():
    """sigmoid(0.1) + 1 - sigmoid(0.2) = 0.524979 + 0.450166 = 0.975145.
    sig'(x) = sig(x) (1 - sig(x)): sig'(0.1) = 0.524979 * 0.475021 = 0.249376, sig'(0.2) = 0.549834 *
    0.450166 = 0.247517. d/dpi_c = 0.1 (0.249376 - 0.247517) = 0.000186 > 0: the chosen log-prob goes
    down; d/dpi_r = 0.1 * 0.247517 = 0.024752: the rejected one goes down faster."""
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    out = apo_down_loss(pc, pr, RC, RR, beta=0.1)
    assert _item(out) == pytest.approx(0.975145, abs=1e-6)
    out.losses.sum().backward()
    assert pc.grad.item() == pytest.approx(0.000186, abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.024752, abs=1e-6)


# ---- DiscoPOP ----

def test_discopop_worked_example_and_rho_zero():
    """rho = 0.2, tau 0.05: m = sigmoid(4) = 0.982014;
    (1 - m) (-log sigmoid(0.2)) + m e^-0.2 = 0.017986 * 0.598139 + 0.982014 * 0.818731 = 0.814763.
    rho = 0: m = 1/2: 0.5 log 2 + 0.5 * 1 = 0.846574."""
    assert _item(discopop_loss(PC, PR, RC, RR, beta=0.1, discopop_tau=0.05)) == pytest.approx(0.814763, abs=1e-6)
    zero = discopop_loss(T([-1.0]), T([-1.0]), T([-1.0]), T([-1.0]), beta=0.1, discopop_tau=0.05)
    assert _item(zero) == pytest.approx(0.846574, abs=1e-6)


def test_discopop_small_tau_is_logistic_below_zero_and_exponential_above():
    """tau -> 0: m is a step at rho = 0. rho = -0.5: -log sigmoid(-0.5) = 0.974077 (DPO);
    rho = +0.5: e^-0.5 = 0.606531."""
    below = discopop_loss(T([-5.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.1, discopop_tau=1e-4)
    above = discopop_loss(T([5.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.1, discopop_tau=1e-4)
    assert _item(below) == pytest.approx(0.974077, abs=1e-6)
    assert _item(above) == pytest.approx(0.606531, abs=1e-6)


def test_discopop_stays_finite_where_the_plain_product_is_nan():
    """rho = -200: sigmoid(rho / tau) underflows to 0 and e^200 overflows float32 to inf; the loss is
    the logistic part, -log sigmoid(-200) = 200, for every tau up to 1."""
    pc = T([-2000.0], requires_grad=True)
    for tau in (0.05, 1.0):
        out = discopop_loss(pc, T([0.0]), T([0.0]), T([0.0]), beta=0.1, discopop_tau=tau)
        assert math.isfinite(out.losses.item())
        out.losses.sum().backward()
        assert torch.isfinite(pc.grad).all()
    assert _item(discopop_loss(pc, T([0.0]), T([0.0]), T([0.0]), beta=0.1, discopop_tau=0.05)) == pytest.approx(200.0)


# ---- f-DPO ----

def test_f_dpo_reverse_kl_is_dpo():
    pc, pr, rc, rr = _random(seed=4, spread=30.0)
    ours = f_dpo_loss(pc, pr, rc, rr, beta=0.1, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5)
    assert torch.equal(ours.losses, sigmoid_dpo_loss(pc, pr, rc, rr, beta=0.1).losses)


@pytest.mark.parametrize("kind,coef,expected", [
    # -e^-1 + e^1 = -0.367879 + 2.718282 = 2.350402; -log sigmoid(0.2350402) = 0.582517
    ("forward_kl", 0.5, 0.582517),
    # log sigmoid(1) - log sigmoid(-1) = 1 (log sig(x) - log sig(-x) = x); -log sigmoid(0.1) = 0.644397
    ("js_divergence", 0.5, 0.644397),
    # (1 - e^-0.5)/0.5 - (1 - e^0.5)/0.5 = 0.786939 + 1.297443 = 2.084381; -log sigmoid(0.2084381) = 0.594349
    ("alpha_divergence", 0.5, 0.594349),
    # (1 - e^-0.3)/0.3 - (1 - e^0.3)/0.3 = 0.863939 + 1.166196 = 2.030135; -log sigmoid(0.2030135) = 0.596783
    ("alpha_divergence", 0.3, 0.596783),
])
def test_f_dpo_by_hand(kind, coef, expected):
    out = f_dpo_loss(PC, PR, RC, RR, beta=0.1, f_divergence_type=kind, f_alpha_divergence_coef=coef)
    assert _item(out) == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1)  # beta * c, untransformed


def test_f_dpo_alpha_limits_are_reverse_and_forward_kl():
    """(1 - u^-alpha)/alpha -> log u as alpha -> 0 (reverse KL, DPO) and is 1 - 1/u at alpha = 1
    (forward KL plus a constant, which cancels in the difference)."""
    pc, pr, rc, rr = _random(seed=5)

    def f(kind, coef=0.5):
        return f_dpo_loss(pc, pr, rc, rr, beta=0.1, f_divergence_type=kind, f_alpha_divergence_coef=coef).losses

    assert torch.allclose(f("alpha_divergence", 1e-6), f("reverse_kl"), atol=1e-5)
    assert torch.allclose(f("alpha_divergence", 1.0), f("forward_kl"), atol=1e-6)
    assert not torch.allclose(f("alpha_divergence", 0.5), f("reverse_kl"), atol=1e-3)


@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_f_dpo_equal_sides_give_ln2_and_extremes_stay_finite(kind):
    out = f_dpo_loss(T([-4.0]), T([-4.0]), T([-3.0]), T([-3.0]), beta=0.1, f_divergence_type=kind,
                     f_alpha_divergence_coef=0.5)
    assert _item(out) == pytest.approx(math.log(2), abs=1e-6)
    pc = T([-1e4, 0.0, -1e4], requires_grad=True)
    out = f_dpo_loss(pc, T([-1e4, -1e4, 0.0]), T([0.0, -1e4, -1e4]), T([-1e4, 0.0, -1e4]), beta=0.1,
                     f_divergence_type=kind, f_alpha_divergence_coef=0.5)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all()


def test_f_dpo_refuses_an_unknown_divergence():
    with pytest.raises(ValueError, match="unknown f_divergence_type 'kl'"):
        f_dpo_loss(PC, PR, RC, RR, beta=0.1, f_divergence_type="kl", f_alpha_divergence_coef=0.5)


# ---- DPO-Positive ----

def test_dpop_penalizes_a_chosen_log_prob_below_the_reference():
    """pi_c = -12 < ref_c = -11: c = -1, r = -1, Delta = 0, penalty max(0, -11 + 12) = 1.
    lambda 50: -log sigmoid(0.1 (0 - 50)) = -log sigmoid(-5) = 5.006715;
    lambda 5: -log sigmoid(-0.5) = 0.974077; lambda 0: log 2 (DPO)."""
    for lam, expected in ((50.0, 5.006715), (5.0, 0.974077), (0.0, math.log(2))):
        out = dpop_loss(T([-12.0]), PR, RC, RR, beta=0.1, dpop_lambda=lam)
        assert _item(out) == pytest.approx(expected, abs=1e-6)
        assert out.metrics["dpop/penalty"].item() == 1.0


def test_dpop_is_dpo_while_the_chosen_log_prob_is_at_or_above_the_reference():
    pc, pr, rc, rr = _random(seed=6, spread=20.0)
    dpo = sigmoid_dpo_loss(pc, pr, rc, rr, beta=0.1).losses
    assert torch.equal(dpop_loss(pc, pr, rc, rr, beta=0.1, dpop_lambda=0.0).losses, dpo)
    above = pc >= rc
    assert above.any() and (~above).any()
    ours = dpop_loss(pc, pr, rc, rr, beta=0.1, dpop_lambda=50.0).losses
    assert torch.equal(ours[above], dpo[above])
    assert (ours[~above] > dpo[~above]).all()
