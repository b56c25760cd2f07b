"""GRPO's loss and group advantages by hand on small tensors (the arithmetic in the docstrings)."""

import math

import pytest
import torch

from preftune.core.losses import LOSSES, group_advantages
from preftune.core.losses.grpo import grpo_loss

KW = dict(clip_epsilon=0.2, clip_epsilon_high=0.0, kl_coef=0.0, grpo_token_level=False)


def test_group_advantages_by_hand_and_zero_variance_groups_are_zero():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 4)
    std = math.sqrt(0.75 / 3)  # sample std of [1, 0, 0, 0] (divide by G - 1, as TRL)
    expected = [0.75 / (std + 1e-4), *[-0.25 / (std + 1e-4)] * 3, 0.0, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert adv[:4].tolist() == pytest.approx([1.499700, -0.499900, -0.499900, -0.499900], abs=1e-6)
    unscaled = group_advantages(torch.tensor([3.0, 1.0, 2.0]), 3, scale=False)  # Dr. GRPO: centred only
    assert unscaled.tolist() == pytest.approx([1.0, -1.0, 0.0])


def test_worked_example_with_the_k3_kl_term():
    lp = torch.tensor([[-1.0, -2.0]])
    out = grpo_loss(lp, lp, lp - 0.1, torch.tensor([1.0]), torch.ones(1, 2), **{**KW, "kl_coef": 0.1})
    kl = math.exp(-0.1) + 0.1 - 1
    assert out.losses.item() == pytest.approx(-1 + 0.1 * kl, abs=1e-7) == pytest.approx(-0.9995163, abs=1e-7)
    assert out.metrics["kl"].item() == pytest.approx(kl, abs=1e-7)
    assert out.metrics["ratio"].item() == 1.0 and out.metrics["clipped"].item() == 0.0


def test_at_ratio_one_the_gradient_is_the_advantage_weighted_policy_gradient():
    """One pass per batch of samples: old == current, so d loss / d logp_t = -A / n_tokens."""
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([2.0, -1.0])
    out = grpo_loss(lp, lp.detach(), None, adv, mask, **KW)
    out.losses.mean().backward()
    expected = torch.tensor([[-2 / 3 / 2] * 3, [1 / 2 / 2, 1 / 2 / 2, 0.0]])
    assert torch.allclose(lp.grad, expected, atol=1e-7), lp.grad


def test_clipping_stops_the_gradient_where_the_clip_binds():
    old = torch.zeros(1, 4)
    # ratios e^0.5 (above 1.2), e^-0.5 (below 0.8), e^0.1, e^-0.1 (inside)
    lp = torch.tensor([[0.5, -0.5, 0.1, -0.1]], requires_grad=True)
    for a, bound in ((1.0, 0), (-1.0, 1)):  # A > 0 clips the high ratio, A < 0 the low one
        lp.grad = None
        out = grpo_loss(lp, old, None, torch.tensor([a]), torch.ones(1, 4), **KW)
        out.losses.sum().backward()
        assert lp.grad[0, bound].item() == 0.0 and lp.grad[0, 1 - bound].item() != 0.0
        assert out.metrics["clipped"].item() == 0.25
        ratios = torch.exp(lp.detach()[0])
        clipped = torch.clamp(ratios, 0.8, 1.2)
        expected = -torch.minimum(ratios * a, clipped * a).mean().item()
        assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    # clip-higher: eps_high 0.7 lets the e^0.5 = 1.65 ratio through for A > 0
    lp.grad = None
    grpo_loss(lp, old, None, torch.tensor([1.0]), torch.ones(1, 4), **{**KW, "clip_epsilon_high": 0.7}).losses.sum().backward()
    assert lp.grad[0, 0].item() != 0.0


def test_sequence_and_token_level_reductions_by_hand():
    lp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([1.0, 3.0])
    seq = grpo_loss(lp, lp, None, adv, mask, **KW).losses
    tok = grpo_loss(lp, lp, None, adv, mask, **{**KW, "grpo_token_level": True}).losses
    assert seq.tolist() == [-1.0, -3.0]  # each completion's token mean; the loop takes the mean: -2
    # token level: (4 * -1 + 1 * -3) / 5 tokens = -1.4, returned per completion so that the mean is it
    assert tok.mean().item() == pytest.approx(-1.4) and tok.tolist() == pytest.approx([-4 * 2 / 5, -3 * 2 / 5])


def test_grpo_is_registered_as_a_rollout_loss():
    spec = LOSSES["grpo"]
    assert spec.kind.name == "rollouts" and spec.kind.data == "prompts" and spec.needs_reference
    assert spec.params == ("clip_epsilon", "clip_epsilon_high", "kl_coef", "grpo_token_level", "tis_cap")


def test_truncated_importance_sampling_by_hand():
    """The sampler gave token 1 a third of the trainer's probability (old - sampler = log 3) and
    token 2 the same: weights min(3, cap) and 1 on the policy term, the KL term untouched."""
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    sampler = lp.detach() - torch.tensor([[math.log(3.0), 0.0]])
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2)
    plain = grpo_loss(lp, lp.detach(), None, adv, mask, **KW)
    capped = grpo_loss(lp, lp.detach(), None, adv, mask, **KW, tis_cap=2.0, sampler_logps=sampler)
    wide = grpo_loss(lp, lp.detach(), None, adv, mask, **KW, tis_cap=5.0, sampler_logps=sampler)
    assert plain.losses.item() == pytest.approx(-1.0)  # ratio 1: -A per token, averaged
    assert capped.losses.item() == pytest.approx((-2.0 - 1.0) / 2, abs=1e-6)
    assert wide.losses.item() == pytest.approx((-3.0 - 1.0) / 2, abs=1e-6)
    assert capped.metrics["tis/weight"].item() == pytest.approx(1.5, abs=1e-6)
    capped.losses.sum().backward()
    assert lp.grad[0].tolist() == pytest.approx([-1.0, -0.5], abs=1e-6)  # -w_t * A / n_tokens
    # off (the default), or no sampler log-probs: unweighted, and no tis metric
    assert grpo_loss(lp, lp.detach(), None, adv, mask, **KW, tis_cap=0.0, sampler_logps=sampler).losses.item() == \
        pytest.approx(-1.0)
    assert "tis/weight" not in plain.metrics
    # the KL term is not weighted
    ref = lp.detach() - 0.1
    both = grpo_loss(lp, lp.detach(), ref, adv, mask, **{**KW, "kl_coef": 0.1}, tis_cap=2.0, sampler_logps=sampler)
    kl = math.exp(-0.1) + 0.1 - 1
    assert both.losses.item() == pytest.approx((-2.0 - 1.0) / 2 + 0.1 * kl, abs=1e-6)
