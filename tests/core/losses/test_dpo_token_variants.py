"""Hand computations and limits for LD-DPO, WPO and BCO (paired), the arithmetic in each docstring,
and bco_pair's running baseline (core/losses/state.py).

Worked inputs as in test_dpo_variants.py: policy -10 / -15, reference -11 / -14, beta 0.1, so the
log-ratios are c = 1, r = -1 and Delta = 2 (DPO's loss there: -log sigmoid(0.2) = 0.598139).
"""

import math

import pytest
import torch

from preftune.core.losses import LOSSES
from preftune.core.losses.dpo import sigmoid_dpo_loss
from preftune.core.losses.dpo_variants import bco_pair_loss, ld_dpo_loss, wpo_loss
from preftune.core.losses.state import RunningRewardMean

T = torch.tensor
PC, PR, RC, RR = T([-10.0]), T([-15.0]), T([-11.0]), T([-14.0])
ZERO = T([0.0])


def _random(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rc, rr = (-60 * torch.rand(n, generator=g) for _ in range(2))
    pc, pr = (ref + 3 * (2 * torch.rand(n, generator=g) - 1) for ref in (rc, rr))
    return pc, pr, rc, rr


def _tails(n=8, seed=1):
    """Per pair, a tail on one side only (the longer completion's), policy and reference: (4, n)."""
    g = torch.Generator().manual_seed(seed)
    longer_chosen = torch.rand(n, generator=g) < 0.5
    policy, reference = -10 * torch.rand(n, generator=g), -10 * torch.rand(n, generator=g)
    zero = torch.zeros(n)
    return (torch.where(longer_chosen, policy, zero), torch.where(longer_chosen, zero, policy),
            torch.where(longer_chosen, reference, zero), torch.where(longer_chosen, zero, reference))


def _ld(pc, pr, rc, rr, alpha, tails):
    return ld_dpo_loss(pc, pr, rc, rr, beta=0.1, ld_alpha=alpha, policy_chosen_tail_logps=tails[0],
                       policy_rejected_tail_logps=tails[1], reference_chosen_tail_logps=tails[2],
                       reference_rejected_tail_logps=tails[3])


# ---- LD-DPO ----

def test_ld_dpo_worked_example():
    """The rejected completion is the longer one; its tokens past the chosen one's length sum to
    -4 under the policy and -3.5 under the reference. alpha 0.5 keeps half of each tail:
    pi^_r = -15 - 0.5 * (-4) = -13, ref^_r = -14 - 0.5 * (-3.5) = -12.25, so r = -0.75, c = 1,
    Delta = 1.75 and the loss is log(1 + e^-0.175) = 0.609470.
    alpha 0 drops the tails: pi^_r = -11, ref^_r = -10.5, r = -0.5, Delta = 1.5 -> log(1 + e^-0.15) = 0.620957.
    The logged rewards are the desensitised ones: 0.1 * 1 and 0.1 * -0.75."""
    tails = (ZERO, T([-4.0]), ZERO, T([-3.5]))
    out = _ld(PC, PR, RC, RR, 0.5, tails)
    assert out.losses.item() == pytest.approx(0.609470, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.075)
    assert _ld(PC, PR, RC, RR, 0.0, tails).losses.item() == pytest.approx(0.620957, abs=1e-6)


def test_ld_dpo_is_sigmoid_dpo_at_alpha_1_and_for_equal_lengths():
    """alpha = 1 counts every token once: DPO whatever the tails; equal lengths have no tails: DPO
    whatever alpha."""
    pc, pr, rc, rr = _random()
    dpo = sigmoid_dpo_loss(pc, pr, rc, rr, beta=0.1).losses
    assert torch.equal(_ld(pc, pr, rc, rr, 1.0, _tails()).losses, dpo)
    zeros = (torch.zeros(8),) * 4
    assert torch.equal(_ld(pc, pr, rc, rr, 0.3, zeros).losses, dpo)


def test_ld_dpo_weights_the_tail_of_the_policy_and_of_the_reference_alike():
    """A tail that is the same under the policy and the reference cancels in the log-ratio (any
    alpha); a policy tail alone shifts Delta by -(1 - alpha) tail_c for the chosen side."""
    pc, pr, rc, rr = _random(seed=2)
    same = (T([-5.0] * 8), torch.zeros(8), T([-5.0] * 8), torch.zeros(8))
    assert torch.allclose(_ld(pc, pr, rc, rr, 0.2, same).losses, sigmoid_dpo_loss(pc, pr, rc, rr, beta=0.1).losses,
                          atol=1e-6)
    policy_only = (T([-5.0] * 8), torch.zeros(8), torch.zeros(8), torch.zeros(8))
    shifted = sigmoid_dpo_loss(pc + 0.8 * 5.0, pr, rc, rr, beta=0.1).losses  # pi^_c = pi_c - 0.8 * (-5)
    assert torch.allclose(_ld(pc, pr, rc, rr, 0.2, policy_only).losses, shifted, atol=1e-6)


# ---- WPO ----

def test_wpo_worked_example():
    """w(y_w) = 0.5, w(y_l) = 0.2: 0.5 * 0.2 * 0.598139 = 0.059814; the product is logged."""
    out = wpo_loss(PC, PR, RC, RR, beta=0.1, chosen_weights=T([0.5]), rejected_weights=T([0.2]))
    assert out.losses.item() == pytest.approx(0.059814, abs=1e-6)
    assert out.metrics["wpo/weight"].item() == pytest.approx(0.1)


def test_wpo_is_sigmoid_dpo_with_unit_weights_and_its_weights_carry_no_gradient():
    pc, pr, rc, rr = _random(seed=3)
    ones = torch.ones(8)
    assert torch.equal(wpo_loss(pc, pr, rc, rr, beta=0.1, chosen_weights=ones, rejected_weights=ones).losses,
                       sigmoid_dpo_loss(pc, pr, rc, rr, beta=0.1).losses)
    w = torch.full((8,), 0.7, requires_grad=True)
    policy = pc.clone().requires_grad_()
    out = wpo_loss(policy, pr, rc, rr, beta=0.1, chosen_weights=w, rejected_weights=w)
    out.losses.sum().backward()
    assert w.grad is None and policy.grad.abs().sum() > 0
    # the gradient is DPO's scaled by the weights: d/d pi_c = -beta w^2 (1 - sigmoid(beta Delta))
    delta = (pc - rc) - (pr - rr)
    assert torch.allclose(policy.grad, -0.1 * 0.49 * (1 - torch.sigmoid(0.1 * delta)), atol=1e-7)


# ---- BCO (paired) ----

def test_bco_pair_worked_example():
    """delta 0: -log sigmoid(0.1) - log sigmoid(0.1) = 2 * 0.644397 = 1.288793;
    delta 0.05: -log sigmoid(0.1 - 0.05) - log sigmoid(-(-0.1 - 0.05)) = 0.668460 + 0.620957 = 1.289417."""
    assert bco_pair_loss(PC, PR, RC, RR, beta=0.1, reward_baseline=T(0.0)).losses.item() == pytest.approx(
        1.288793, abs=1e-6)
    out = bco_pair_loss(PC, PR, RC, RR, beta=0.1, reward_baseline=T(0.05))
    assert out.losses.item() == pytest.approx(1.289417, abs=1e-6)
    assert out.metrics["bco/baseline"].tolist() == pytest.approx([0.05])


def test_bco_pair_classifies_each_side_around_the_baseline():
    """Shifting both rewards and the baseline by the same k changes nothing (the baseline is where
    the decision boundary sits); equal sides at the baseline give 2 ln 2; the baseline carries no
    gradient."""
    pc, pr, rc, rr = _random(seed=4)
    base = bco_pair_loss(pc, pr, rc, rr, beta=0.1, reward_baseline=T(0.3)).losses
    moved = bco_pair_loss(pc + 20.0, pr + 20.0, rc, rr, beta=0.1, reward_baseline=T(0.3 + 2.0)).losses
    assert torch.allclose(base, moved, atol=1e-5)
    level = bco_pair_loss(T([-4.0]), T([-4.0]), T([-3.0]), T([-3.0]), beta=0.1, reward_baseline=T(-0.1))
    assert level.losses.item() == pytest.approx(2 * math.log(2), abs=1e-6)
    delta = T(0.2, requires_grad=True)
    bco_pair_loss(pc.requires_grad_(), pr, rc, rr, beta=0.1, reward_baseline=delta).losses.sum().backward()
    assert delta.grad is None


def test_running_reward_mean_is_the_mean_of_the_micro_batch_means():
    """Micro-batch 1: beta c = [0.1, 0.3], beta r = [-0.2, 0.0] -> m_1 = 0.2 / 4 = 0.05;
    micro-batch 2: beta c = [0.5], beta r = [0.1] -> m_2 = 0.3. delta_1 = 0.05, delta_2 = (0.05 + 0.3) / 2
    = 0.175 (each micro-batch weighs one, whatever its size). Its state round-trips exactly."""
    state = RunningRewardMean()
    assert state.inputs("cpu")["reward_baseline"].item() == 0.0
    state.observe(T([1.0, 3.0]), T([-2.0, 0.0]), T([0.0, 0.0]), T([0.0, 0.0]), beta=0.1)
    assert state.mean == pytest.approx(0.05) and state.count == 1
    state.observe(T([6.0]), T([2.0]), T([1.0]), T([1.0]), beta=0.1)
    assert state.mean == pytest.approx(0.175) and state.count == 2
    again = RunningRewardMean()
    again.load_state_dict(state.state_dict())
    assert again.state_dict() == state.state_dict() and again.inputs("cpu")["reward_baseline"].item() == pytest.approx(
        0.175)


def test_the_registry_says_what_each_forward_computes():
    """LD-DPO asks its forward for tails (policy and reference), WPO for the policy's weights;
    BCO keeps a running baseline as loop state."""
    assert LOSSES["ld_dpo"].inputs == ("tail_logps",) and LOSSES["ld_dpo"].params == ("beta", "ld_alpha")
    assert LOSSES["wpo"].input_keys == ("chosen_weights", "rejected_weights") and not LOSSES["wpo"].state
    assert isinstance(LOSSES["bco_pair"].new_state(), RunningRewardMean) and LOSSES["sigmoid"].new_state() is None
