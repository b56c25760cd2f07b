"""PPO, RLOO and REINFORCE++ by hand on small tensors: the KL in the reward, GAE, whitening, the
estimators and the clipped policy and value losses."""

import math

import pytest
import torch

from preftune.core.losses.ppo import (
    explained_variance,
    gae,
    gae_advantages,
    kl_penalized_rewards,
    ppo_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)
from preftune.runs.online.ppo import adaptive_kl_coef

MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_kl_in_the_reward_and_the_score_on_the_last_token():
    old = torch.tensor([[0.5, 0.2, 9.0], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.3, 9.0], [0.1, 0.0, -0.2]])
    rewards, kl = kl_penalized_rewards(torch.tensor([1.0, -2.0]), old, ref, MASK, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -0.1, 0.0], [-0.1, 0.0, 0.2]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.01 + 1.0, 0.0], [0.01, 0.0, -0.02 - 2.0]]))


def test_gae_by_hand():
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.tensor([[1, 1]]), gamma=1.0, lam=0.9)
    assert torch.allclose(adv, torch.tensor([[0.42, 0.8]]))
    assert torch.allclose(ret, torch.tensor([[0.92, 1.0]]))
    # gamma 0.5, lam 1: A_1 = 1 - 0.2 = 0.8; A_0 = 0 + 0.5 * 0.2 - 0.5 + 0.5 * 0.8 = 0.0
    adv, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.tensor([[1, 1]]), gamma=0.5, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.0, 0.8]]))


def test_gae_skips_positions_outside_the_mask():
    """A row whose completion starts later (padding before it) gets the same advantages as alone."""
    r, v = torch.tensor([[9.0, 0.0, 1.0]]), torch.tensor([[7.0, 0.5, 0.2]])
    adv, ret = gae(r, v, torch.tensor([[0, 1, 1]]), gamma=1.0, lam=0.9)
    assert torch.allclose(adv, torch.tensor([[0.0, 0.42, 0.8]])) and ret[0, 0] == 0


def test_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert torch.allclose(whiten(x, m), torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(whiten(x, m, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), atol=1e-6)


def test_gae_advantages_whiten_and_returns_do_not():
    scores, zeros = torch.tensor([1.0, 0.0]), torch.zeros(2, 3)
    values = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.1, 0.1]])
    adv, ret, _ = gae_advantages(scores, zeros, zeros, MASK, kl_coef=0.1, values=values, gamma=1.0, lam=0.9)
    raw, raw_ret = gae(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), values, MASK, gamma=1.0, lam=0.9)
    assert torch.allclose(ret, raw_ret)
    flat = raw[MASK.bool()]
    assert torch.allclose(adv[MASK.bool()], (flat - flat.mean()) / torch.sqrt(flat.var() + 1e-8))


def test_rloo_leave_one_out_by_hand():
    m = torch.ones(4, 2)
    zeros = torch.zeros(4, 2)
    adv, ret, _ = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), zeros, zeros, m, kl_coef=0.5, group_size=4)
    assert torch.allclose(adv[:, 0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert torch.equal(adv[:, 0], adv[:, 1])  # one advantage per completion, at every token
    # the KL joins the sequence reward: R = score - 0.5 * sum(old - ref); two groups of 2
    old = torch.tensor([[0.2, 0.2], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    adv, ret, _ = rloo_advantages(torch.tensor([1.0, 1.0, 2.0, 0.0]), old, torch.zeros(4, 2), m, kl_coef=0.5,
                                  group_size=2)
    r = torch.tensor([1.0 - 0.2, 1.0, 2.0, 0.0 - 0.5])
    assert torch.allclose(ret[:, 0], r)
    assert torch.allclose(adv[:, 0], torch.tensor([r[0] - r[1], r[1] - r[0], r[2] - r[3], r[3] - r[2]]))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.zeros(2), zeros[:2], zeros[:2], m[:2], kl_coef=0.0, group_size=1)


def test_reinforce_pp_returns_to_go_normalised_over_the_batch():
    old = torch.tensor([[0.5, 0.2, 0.0], [0.0, 0.0, 0.0]])
    scores = torch.tensor([1.0, -1.0])
    adv, ret, _ = reinforce_pp_advantages(scores, old, torch.zeros(2, 3), MASK, kl_coef=0.1)
    # rewards row 0: [-0.05, -0.02 + 1]; row 1: [0, 0, -1]; returns-to-go
    want = torch.tensor([[-0.05 + 0.98, 0.98, 0.0], [-1.0, -1.0, -1.0]])
    assert torch.allclose(ret, want)
    flat = want[MASK.bool()]
    assert torch.allclose(adv[MASK.bool()], (flat - flat.mean()) / torch.sqrt(flat.var() + 1e-8))
    # the baseline variant centres each group's scores first: groups of 2 -> [1, -1] stay, [3, 1] -> [1, -1]
    _, ret_b, _ = reinforce_pp_advantages(torch.tensor([3.0, 1.0]), torch.zeros(2, 3), torch.zeros(2, 3), MASK,
                                          kl_coef=0.0, group_size=2, baseline=True)
    assert torch.allclose(ret_b, torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]]))


def test_ppo_loss_worked_example_and_value_clipping():
    old = torch.zeros(1, 1)
    lp = (old + math.log(1.5)).requires_grad_()
    values = torch.tensor([[0.5]], requires_grad=True)
    out = ppo_loss(lp, old, torch.ones(1, 1), torch.ones(1, 1), clip_epsilon=0.2, values=values,
                   old_values=torch.zeros(1, 1), returns=torch.ones(1, 1), vf_coef=0.1, vf_clip=0.2)
    assert out.losses.item() == pytest.approx(-1.2 + 0.1 * 0.32, abs=1e-6)
    assert out.metrics["policy/clipfrac"].item() == 1.0 and out.metrics["value/clipfrac"].item() == 1.0
    out.losses.sum().backward()
    assert lp.grad.item() == 0.0  # clipped: no policy gradient
    assert values.grad.item() == 0.0  # the clipped value loss is the larger: no value gradient either


def test_ppo_loss_unclipped_is_the_policy_gradient_and_token_mean():
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])
    out = ppo_loss(lp, lp.detach(), adv, m, clip_epsilon=0.2)
    # ratio 1 everywhere: loss = mean over the 3 tokens of -A = (-2 - 2 + 1) / 3
    assert out.losses.mean().item() == pytest.approx(-1.0)
    out.losses.mean().backward()
    assert torch.allclose(lp.grad, torch.tensor([[-2 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]]))
    assert "value/loss" not in out.metrics


def test_explained_variance():
    m = torch.ones(1, 4)
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert explained_variance(ret, ret, m) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.5), ret, m) == pytest.approx(0.0)
    assert math.isnan(explained_variance(ret, torch.ones(1, 4), m))


def test_adaptive_kl_controller():
    assert adaptive_kl_coef(0.1, 12.0, target=6.0, samples=64, horizon=10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 1e4))
    assert adaptive_kl_coef(0.1, 5.7, target=6.0, samples=100, horizon=100) == pytest.approx(0.1 * (1 - 0.05))


def test_scores_shaped_for_a_missing_eos_clipped_and_scaled():
    from preftune.core.losses.ppo import shaped_scores

    s, no_eos = torch.tensor([2.0, -3.0]), torch.tensor([1.0, 0.0])
    assert torch.equal(shaped_scores(s, no_eos, missing_eos_penalty=1.0, reward_clip=2.5), torch.tensor([1.0, -2.5]))
    assert torch.equal(shaped_scores(s, no_eos), s)
    w = shaped_scores(torch.tensor([1.0, 3.0]), torch.zeros(2), whiten_rewards=True)
    assert w.mean().item() == pytest.approx(2.0) and w.std().item() == pytest.approx(1.0, abs=1e-6)
