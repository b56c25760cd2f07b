"""Golden values per loss, with the arithmetic written out (LOSSES.md hand checks)."""

import pytest
import torch

from preftune.core.losses.dpo import cdpo_loss, hinge_loss, ipo_loss, robust_dpo_loss
from preftune.core.losses.kto import kto_loss
from preftune.core.losses.reference_free import nll_loss, orpo_loss, sft_loss, simpo_loss

T = torch.tensor
PC, PR, RC, RR = T([-10.0]), T([-15.0]), T([-11.0]), T([-14.0])  # Delta = 2


def test_cdpo():
    """-(0.9) log sig(0.2) - 0.1 log sig(-0.2) = 0.9 * 0.598139 + 0.1 * 0.798139 = 0.618139."""
    assert cdpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1).losses.item() == pytest.approx(0.618139, abs=1e-6)


def test_robust():
    """(0.9 * 0.598139 - 0.1 * 0.798139) / (1 - 0.2) = 0.458511 / 0.8 = 0.573139."""
    out = robust_dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.573139, abs=1e-6)


def test_hinge():
    """relu(1 - 0.1 * 2) = 0.8; with beta 1: relu(1 - 2) = 0."""
    assert hinge_loss(PC, PR, RC, RR, beta=0.1).losses.item() == pytest.approx(0.8)
    assert hinge_loss(PC, PR, RC, RR, beta=1.0).losses.item() == 0.0


def test_ipo_summed_normalized_and_its_anchor():
    """Summed: (2 - 1/(2*0.1))^2 = (2 - 5)^2 = 9. Normalized |y_w|=5, |y_l|=6: h = 1/5 + 1/6 =
    0.366667, (0.366667 - 5)^2 = 21.467778. At h = 1/(2 beta) = 5 the loss is 0 (the anchor)."""
    lengths = {"chosen_lengths": T([5.0]), "rejected_lengths": T([6.0])}
    assert ipo_loss(PC, PR, RC, RR, beta=0.1, ipo_length_normalize=False, **lengths).losses.item() == pytest.approx(9.0)
    normalized = ipo_loss(PC, PR, RC, RR, beta=0.1, ipo_length_normalize=True, **lengths).losses.item()
    assert normalized == pytest.approx(21.467778, abs=1e-5)
    anchor = ipo_loss(T([-6.0]), T([-15.0]), T([-11.0]), T([-15.0]), beta=0.1, ipo_length_normalize=False, **lengths)
    assert anchor.losses.item() == pytest.approx(0.0, abs=1e-10)


def test_simpo_worked_example():
    """beta 2, gamma 0.5: a_w = -45/90 = -0.5, a_l = -36/60 = -0.6; 2 * 0.1 - 0.5 = -0.3;
    -log sigmoid(-0.3) = log(1 + e^0.3) = 0.854355. Rewards 2 * a: -1.0 and -1.2."""
    out = simpo_loss(T([-45.0]), T([-36.0]), T([0.0]), T([0.0]), beta=2.0, simpo_gamma=0.5,
                     chosen_lengths=T([90]), rejected_lengths=T([60]))
    assert out.losses.item() == pytest.approx(0.8544, abs=1e-4)
    assert out.losses.item() == pytest.approx(0.854355, abs=1e-6)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-1.0, -1.2))


def test_orpo():
    """a_w = -5/10 = -0.5, a_l = -10/10 = -1.0, lambda 0.1.
    log odds(a) = a - log(1 - e^a): 0.432752 and -0.541325; ratio 0.974077;
    -log sigmoid(0.974077) = 0.320300; loss = 0.5 + 0.1 * 0.320300 = 0.532030."""
    out = orpo_loss(T([-5.0]), T([-10.0]), T([0.0]), T([0.0]), beta=0.1,
                    chosen_lengths=T([10]), rejected_lengths=T([10]))
    assert out.losses.item() == pytest.approx(0.532030, abs=1e-6)
    assert out.metrics["orpo/log_odds_ratio"].item() == pytest.approx(0.974077, abs=1e-6)


def test_sft_is_length_normalized_nll_of_chosen():
    """-(-10 / 5) = 2.0 per sequence."""
    out = sft_loss(PC, PR, RC, RR, chosen_lengths=T([5.0]), rejected_lengths=T([6.0]))
    assert out.losses.item() == pytest.approx(2.0)


def test_kto_both_classes_and_the_kl_anchor():
    """r = 1 for both examples; KL rows give log-ratios 0.3 and 0.7 -> z0 = 0.5.
    desirable: 1 - sigmoid(0.1 * (1 - 0.5)) = 0.487503 (weight 1)
    undesirable: 2 * (1 - sigmoid(0.1 * (0.5 - 1))) = 2 * 0.512497 = 1.024995"""
    out = kto_loss(T([-9.0, -4.0]), T([-10.0, -5.0]), labels=T([True, False]), policy_kl_logps=T([-2.7, -3.3]),
                   reference_kl_logps=T([-3.0, -4.0]), beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    assert out.losses.tolist() == pytest.approx([0.487503, 1.024995], abs=1e-6)
    assert out.metrics["kl"].item() == pytest.approx(0.5)
    assert out.rewards.tolist() == pytest.approx([0.1, 0.1])


def test_kto_anchor_is_clamped_at_zero_and_carries_no_gradient():
    """z0 is a baseline, not a target: the loss's gradient reaches the example's own log-probs
    and never the KL rows, whether z0 is clamped (mean KL-row log-ratio -4 -> 0) or not (+0.5)."""
    for kl_rows, ref_rows, z0 in ((T([-5.0, -6.0]), T([-1.0, -2.0]), 0.0), (T([-2.7, -3.3]), T([-3.0, -4.0]), 0.5)):
        kl_policy = kl_rows.clone().requires_grad_()
        policy = T([-1.0, -2.0], requires_grad=True)
        out = kto_loss(policy, T([-1.0, -2.0]), labels=T([True, False]), policy_kl_logps=kl_policy,
                       reference_kl_logps=ref_rows, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
        assert out.metrics["kl"].item() == pytest.approx(z0)
        out.losses.sum().backward()
        assert kl_policy.grad is None
        # d/dr [1 - sig(0.1 (r - z0))] at r = 0 is -0.1 sig'(-0.1 z0); undesirable is +0.1 sig'(0.1 z0)
        sig = torch.sigmoid(T(0.1 * z0))
        expected = 0.1 * sig * (1 - sig)
        assert policy.grad.tolist() == pytest.approx([-expected.item(), expected.item()], abs=1e-7)


def test_nll_is_the_token_mean_over_the_micro_batch():
    """Two demonstrations of 2 and 6 tokens with summed log-probs -4 and -6: the token mean is
    10 / 8 = 1.25 (a per-example mean would give (2 + 1) / 2 = 1.5); each token weighs the same."""
    logps = torch.tensor([-4.0, -6.0], requires_grad=True)
    out = nll_loss(logps, torch.tensor([2, 6]))
    assert out.losses.mean().item() == pytest.approx(1.25)
    out.losses.mean().backward()
    assert logps.grad.tolist() == pytest.approx([-1 / 8, -1 / 8])  # d/dlogp_i of -sum/8
