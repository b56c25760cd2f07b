"""Hand computations and limits for CPO and SLiC-HF (reference_free.py); SimPO, ORPO and the
NLL terms are in test_family.py."""

import pytest
import torch

from preftune.core.losses.dpo import hinge_loss, sigmoid_dpo_loss
from preftune.core.losses.reference_free import cpo_loss, slic_hf_loss

T = torch.tensor
ZERO = T([0.0])


def test_cpo_worked_example():
    """pi_c = -10, pi_r = -15, |y_w| = 5, beta 0.1: preference -log sigmoid(0.1 * 5) = 0.474077;
    NLL -(-10 / 5) = 2; alpha 1: 2.474077, alpha 0.5: 0.474077 + 1 = 1.474077. Rewards 0.1 * pi."""
    lengths = {"chosen_lengths": T([5.0]), "rejected_lengths": T([6.0])}
    out = cpo_loss(T([-10.0]), T([-15.0]), ZERO, ZERO, beta=0.1, cpo_alpha=1.0, **lengths)
    assert out.losses.item() == pytest.approx(2.474077, abs=1e-6)
    assert out.metrics["cpo/nll"].item() == pytest.approx(2.0)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-1.0, -1.5))
    half = cpo_loss(T([-10.0]), T([-15.0]), ZERO, ZERO, beta=0.1, cpo_alpha=0.5, **lengths)
    assert half.losses.item() == pytest.approx(1.474077, abs=1e-6)


def test_cpo_without_its_nll_is_dpo_against_a_uniform_reference():
    """alpha = 0: -log sigmoid(beta (pi_c - pi_r)) is DPO with reference log-probs equal on both
    sides (a uniform reference), whatever the real reference would say."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc = (-40 * torch.rand(8, generator=g) for _ in range(3))
    lengths = {"chosen_lengths": torch.full((8,), 7.0), "rejected_lengths": torch.full((8,), 3.0)}
    ours = cpo_loss(pc, pr, rc, rc + 5, beta=0.2, cpo_alpha=0.0, **lengths).losses
    assert torch.allclose(ours, sigmoid_dpo_loss(pc, pr, rc, rc, beta=0.2).losses, atol=1e-6)


def test_slic_hf_worked_example():
    """delta 1, lambda 0.1. pi -10 / -9.5: hinge max(0, 1 + 10 - 9.5) = 1.5, NLL 0.1 * 10 = 1.0: 2.5.
    pi -10 / -15: the chosen side leads by 5 > delta, hinge 0: the NLL alone, 1.0.
    Rewards are the log-likelihoods themselves."""
    out = slic_hf_loss(T([-10.0, -10.0]), T([-9.5, -15.0]), ZERO, ZERO, slic_delta=1.0, slic_lambda=0.1)
    assert out.losses.tolist() == pytest.approx([2.5, 1.0])
    assert out.chosen_rewards.tolist() == [-10.0, -10.0]


def test_slic_hf_gradient_stops_at_the_margin_but_the_nll_keeps_pulling():
    """Past the margin only -lambda * pi_c acts: d/dpi_c = -lambda, d/dpi_r = 0; inside it
    d/dpi_c = -1 - lambda and d/dpi_r = +1."""
    pc, pr = T([-10.0, -10.0], requires_grad=True), T([-15.0, -9.5], requires_grad=True)
    slic_hf_loss(pc, pr, ZERO, ZERO, slic_delta=1.0, slic_lambda=0.1).losses.sum().backward()
    assert pc.grad.tolist() == pytest.approx([-0.1, -1.1])
    assert pr.grad.tolist() == pytest.approx([0.0, 1.0])


def test_slic_hf_without_its_regularizer_is_the_hinge_on_policy_log_probs():
    """lambda = 0, delta = 1/beta: max(0, 1/beta - (pi_c - pi_r)) = relu(1 - beta (pi_c - pi_r)) / beta,
    the `hinge` loss against a uniform reference, scaled by 1/beta."""
    g = torch.Generator().manual_seed(1)
    pc, pr = (-30 * torch.rand(8, generator=g) for _ in range(2))
    ours = slic_hf_loss(pc, pr, ZERO, ZERO, slic_delta=1 / 0.25, slic_lambda=0.0).losses
    zeros = torch.zeros(8)
    assert torch.allclose(0.25 * ours, hinge_loss(pc, pr, zeros, zeros, beta=0.25).losses, atol=1e-6)
