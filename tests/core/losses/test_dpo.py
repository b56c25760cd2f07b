import math

import pytest
import torch

from preftune.core.losses import LOSSES
from preftune.core.losses.dpo import sigmoid_dpo_loss

T = torch.tensor


def test_sigmoid_dpo_worked_example():
    """logps pi_c=-10, pi_r=-15, ref_c=-11, ref_r=-14, beta=0.1.

    Delta = (-10 - -11) - (-15 - -14) = 1 - (-1) = 2; beta * Delta = 0.2
    loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.818731) = 0.598139
    (a widely printed 0.6731 for these inputs is wrong).
    rewards: chosen 0.1 * 1 = 0.1, rejected 0.1 * -1 = -0.1.
    """
    out = sigmoid_dpo_loss(T([-10.0]), T([-15.0]), T([-11.0]), T([-14.0]), beta=0.1)
    assert out.losses.item() == pytest.approx(0.598139, abs=1e-6)
    assert out.losses.item() != pytest.approx(0.6731, abs=1e-3)
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-7)
    assert out.rejected_rewards.item() == pytest.approx(-0.1, abs=1e-7)


def test_chosen_equals_rejected_gives_ln2_and_zero_gradient():
    """Delta = 0 -> -log sigmoid(0) = log 2 = 0.693147; d loss / d Delta = -beta/2 on each side cancels."""
    pc = T([-7.0, -3.0], requires_grad=True)
    out = sigmoid_dpo_loss(pc, pc, T([-5.0, -1.0]), T([-5.0, -1.0]), beta=0.5)
    assert torch.allclose(out.losses, torch.full((2,), math.log(2)), atol=1e-7)
    out.losses.sum().backward()
    assert torch.count_nonzero(pc.grad) == 0


def test_beta_scales_the_argument():
    """beta=1, Delta=2: log(1 + e^-2) = 0.126928."""
    out = sigmoid_dpo_loss(T([-10.0]), T([-15.0]), T([-11.0]), T([-14.0]), beta=1.0)
    assert out.losses.item() == pytest.approx(0.126928, abs=1e-6)


def test_registered_with_reference():
    spec = LOSSES["sigmoid"]
    assert spec.fn is sigmoid_dpo_loss and spec.needs_reference and spec.kind.name == "pairs"
