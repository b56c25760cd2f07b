"""The GRPO family (core/losses/grpo_variants.py) by hand on small tensors, the arithmetic in each
docstring; TRL checks the same functions on random tensors in tests/oracle/test_grpo_trl.py."""

import math

import pytest
import torch

from preftune.config import load_config
from preftune.core.losses import LOSSES
from preftune.core.losses import grpo_variants as gv
from preftune.core.losses.grpo import grpo_loss, soft_overlong_penalty

CLIP = dict(clip_epsilon=0.2, clip_epsilon_high=0.0, kl_coef=0.0)
FAMILY = ("dapo", "bnpo", "dr_grpo", "gspo", "luspo", "cispo", "sapo")


def _two():
    """Two completions of 4 and 1 tokens, log-probs 0 (ratio 1), advantages 1 and 3."""
    lp = torch.zeros(2, 4, requires_grad=True)
    return lp, torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]), torch.tensor([1.0, 3.0])


def test_the_family_is_registered_as_rollout_losses_trained_by_preftune_grpo():
    for name in FAMILY:
        spec = LOSSES[name]
        assert spec.kind.name == "rollouts" and spec.kind.command == "grpo" and "kl_coef" in spec.params
        assert "dynamic_sampling" in spec.uses and "overlong_filter" in spec.uses  # the source reads them
    assert len(LOSSES) >= 30


def test_dapo_and_bnpo_are_the_token_level_mean_with_clip_higher():
    """Token level: (4 * -1 + 1 * -3) / 5 tokens = -1.4 (GRPO's per-completion mean would give -2).
    Clip-higher: a ratio e^0.22 = 1.2461 with A = 1 is clipped at 1.2 by eps 0.2 but not by
    eps_high 0.28, so the token keeps its gradient -A r / n_tokens = -1.2461."""
    lp, mask, adv = _two()
    for fn in (gv.dapo_loss, gv.bnpo_loss):
        out = fn(lp, lp.detach(), None, adv, mask, **CLIP)
        assert out.losses.mean().item() == pytest.approx(-1.4)
    assert grpo_loss(lp, lp.detach(), None, adv, mask, **CLIP, grpo_token_level=False).losses.mean().item() == -2.0
    x = torch.tensor([[0.22]], requires_grad=True)
    old, one, a = torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([1.0])
    high = gv.dapo_loss(x, old, None, a, one, clip_epsilon=0.2, clip_epsilon_high=0.28, kl_coef=0.0)
    (g,) = torch.autograd.grad(high.losses.sum(), x)
    assert high.losses.item() == pytest.approx(-math.exp(0.22)) and g.item() == pytest.approx(-math.exp(0.22))
    sym = gv.dapo_loss(x, old, None, a, one, **CLIP)
    (g,) = torch.autograd.grad(sym.losses.sum(), x)
    assert sym.losses.item() == pytest.approx(-1.2) and g.item() == 0.0 and sym.metrics["clipped"].item() == 1.0


def test_dapo_recipe_gives_the_papers_defaults():
    cfg = load_config(None, ["loss.name=dapo"])
    assert (cfg.loss.clip_epsilon, cfg.loss.clip_epsilon_high, cfg.loss.kl_coef, cfg.loss.dynamic_sampling) == \
        (0.2, 0.28, 0.0, True)
    cfg = load_config(None, ["loss.name=gspo"])
    assert (cfg.loss.clip_epsilon, cfg.loss.clip_epsilon_high, cfg.loss.kl_coef) == (3e-4, 4e-4, 0.0)
    grpo = load_config(None, ["loss.name=grpo"])  # GRPO's own defaults are untouched
    assert (grpo.loss.clip_epsilon_high, grpo.loss.kl_coef, grpo.loss.dynamic_sampling) == (0.0, 0.04, False)


def test_dr_grpo_divides_by_one_constant():
    """sum over tokens / (N * L_max): (4 * -1 + 1 * -3) / (2 * 8) = -0.4375 with L_max 8; with
    dr_grpo_tokens 0 the mask's width 4: -7 / 8 = -0.875. The gradient of a token is -A / (N L_max):
    -1/16 and -3/16, whatever the completion's length (GRPO's would be -A / (N |y|))."""
    lp, mask, adv = _two()
    out = gv.dr_grpo_loss(lp, lp.detach(), None, adv, mask, **CLIP, dr_grpo_tokens=8)
    assert out.losses.mean().item() == pytest.approx(-0.4375)
    out.losses.mean().backward()
    assert lp.grad.flatten().tolist() == pytest.approx([-1 / 16] * 4 + [-3 / 16, 0, 0, 0])
    assert gv.dr_grpo_loss(lp, lp.detach(), None, adv, mask, **CLIP, dr_grpo_tokens=0).losses.mean().item() == \
        pytest.approx(-0.875)


def test_gspo_clips_the_length_normalised_sequence_ratio():
    """Completion 1: log-ratios 0.1, 0.3 -> log s = 0.2, s = 1.2214 > 1.2: L = -1.2, no gradient.
    Completion 2: log-ratios 0.05, -0.05 and a masked token -> s = 1 (inside): L = -A s = -2,
    gradient -A s / |y| / N = -2 * 1 / 2 / 2 = -0.5 on each of its two tokens (the mean over N = 2)."""
    lp = torch.tensor([[0.1, 0.3, 0.0], [0.05, -0.05, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    out = gv.gspo_loss(lp, torch.zeros(2, 3), None, torch.tensor([1.0, 2.0]), mask, **CLIP)
    assert out.losses.tolist() == pytest.approx([-1.2, -2.0], abs=1e-6)
    assert out.metrics["clipped"].tolist() == [1.0, 0.0]
    assert out.metrics["ratio"].tolist() == pytest.approx([math.exp(0.2), 1.0], abs=1e-6)
    out.losses.mean().backward()
    assert lp.grad.flatten().tolist() == pytest.approx([0.0, 0.0, 0.0, -0.5, -0.5, 0.0], abs=1e-6)
    # token-level clipping would not clip completion 1 the same way: its second token alone is e^0.3
    tok = grpo_loss(lp.detach(), torch.zeros(2, 3), None, torch.tensor([1.0, 2.0]), mask, **CLIP,
                    grpo_token_level=False)
    assert tok.losses[0].item() == pytest.approx(-(math.exp(0.1) + 1.2) / 2, abs=1e-6)


def test_luspo_is_gspo_times_the_completion_length():
    """GSPO's -1.2 and -2.0 on completions of 2 tokens each: -2.4 and -4.0; a 3-token completion at
    s = 1 with A = 1 gives -3 (GSPO: -1)."""
    lp = torch.tensor([[0.1, 0.3, 0.0], [0.05, -0.05, 9.0], [0.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, 2.0, 1.0])
    out = gv.luspo_loss(lp, torch.zeros(3, 3), None, adv, mask, **CLIP)
    assert out.losses.tolist() == pytest.approx([-2.4, -4.0, -3.0], abs=1e-6)
    gspo = gv.gspo_loss(lp, torch.zeros(3, 3), None, adv, mask, **CLIP)
    assert gspo.losses[2].item() == pytest.approx(-1.0)


def test_cispo_keeps_the_gradient_where_the_weight_is_clipped():
    """Token 1: ratio e^0.5 = 1.6487 > cap 1.2, log pi = -0.5, A = 1: L = -1.2 * 1 * -0.5 = 0.6 and
    d L / d log pi = -1.2 (PPO's clip would give 0). Token 2: ratio 1, log pi = -1: L = -1 * -1 = 1,
    gradient -1. Token mean over the micro-batch: (0.6 + 1) / 2 = 0.8, gradients halved."""
    lp = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0]])
    out = gv.cispo_loss(lp, old, None, torch.tensor([1.0]), torch.ones(1, 2), cispo_weight_min=0.0,
                     cispo_weight_max=1.2, kl_coef=0.0)
    assert out.losses.item() == pytest.approx(0.8)
    out.losses.sum().backward()
    assert lp.grad.flatten().tolist() == pytest.approx([-0.6, -0.5])
    assert out.metrics["clipped"].item() == 0.5
    # a lower bound lifts a small weight: ratio e^-1 = 0.3679 -> 0.5
    low = gv.cispo_loss(torch.tensor([[-2.0]]), torch.tensor([[-1.0]]), None, torch.tensor([1.0]), torch.ones(1, 1),
                     cispo_weight_min=0.5, cispo_weight_max=5.0, kl_coef=0.0)
    assert low.losses.item() == pytest.approx(-0.5 * -2.0)


def test_sapo_soft_gate_by_hand():
    """r = 1: f = (4 / tau) sigmoid(0) = 2 / tau. A = 2 at tau_pos 1: L = -4; A = -1 at tau_neg 1.05:
    L = 2 / 1.05 = 1.904762; the gradient at r = 1 is -A (slope 1, the policy gradient).
    Off-policy, r = e^0.5, tau 1, A = 1: L = -4 sigmoid(0.6487) = -2.626889; its gradient
    -4 s (1 - s) r = -1.486739 (a hard clip at 1.2 would give 0)."""
    lp = torch.zeros(2, 1, requires_grad=True)
    out = gv.sapo_loss(lp, torch.zeros(2, 1), None, torch.tensor([2.0, -1.0]), torch.ones(2, 1),
                    sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, kl_coef=0.0)
    assert out.losses.tolist() == pytest.approx([-4.0, 2 / 1.05], abs=1e-6)
    out.losses.sum().backward()
    assert lp.grad.flatten().tolist() == pytest.approx([-2.0, 1.0], abs=1e-6)
    x = torch.tensor([[0.5]], requires_grad=True)
    off = gv.sapo_loss(x, torch.zeros(1, 1), None, torch.tensor([1.0]), torch.ones(1, 1), sapo_temperature_pos=1.0,
                    sapo_temperature_neg=1.05, kl_coef=0.0)
    s = 1 / (1 + math.exp(-(math.exp(0.5) - 1)))
    assert off.losses.item() == pytest.approx(-4 * s, abs=1e-6) == pytest.approx(-2.626889, abs=1e-6)
    off.losses.backward()
    assert x.grad.item() == pytest.approx(-4 * s * (1 - s) * math.exp(0.5), abs=1e-6) == \
        pytest.approx(-1.486739, abs=1e-6)


def test_the_kl_term_and_tis_weight_act_on_every_member_the_same_way():
    """k3 KL e^-0.1 + 0.1 - 1 = 0.0048374 per token at ref = logp - 0.1, times kl_coef 0.1, added to
    each loss's policy term at ratio 1 (one completion of two tokens, A = 1, log pi = -1):
    dapo/bnpo/gspo -1; dr_grpo (L_max 2) -1; luspo -2 (the sum: KL counted per token too); sapo
    -(4 / tau) sigmoid(0) = -2;
    cispo -(-1) = 1."""
    lp = torch.full((1, 2), -1.0)
    kl = math.exp(-0.1) + 0.1 - 1
    settings = {"dapo": CLIP, "bnpo": CLIP, "gspo": CLIP, "luspo": CLIP, "dr_grpo": {**CLIP, "dr_grpo_tokens": 2},
                "cispo": dict(cispo_weight_min=0.0, cispo_weight_max=5.0, kl_coef=0.0),
                "sapo": dict(sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, kl_coef=0.0)}
    policy = {"dapo": -1, "bnpo": -1, "gspo": -1, "luspo": -2, "dr_grpo": -1, "cispo": 1, "sapo": -2}
    for name, kw in settings.items():
        out = LOSSES[name].fn(lp, lp, lp - 0.1, torch.tensor([1.0]), torch.ones(1, 2), **{**kw, "kl_coef": 0.1})
        per = 2 if name == "luspo" else 1
        assert out.losses.item() == pytest.approx(policy[name] + 0.1 * kl * per, abs=1e-7), name
        assert out.metrics["kl"].item() == pytest.approx(kl, abs=1e-7)


def test_soft_overlong_penalty_by_hand():
    """L_max 32, L_cache 8, penalty 1: lengths 24 (the start of the buffer), 28, 32 lose 0, 0.5, 1;
    a buffer of 0 is off."""
    lengths = torch.tensor([10, 24, 28, 32])
    assert soft_overlong_penalty(lengths, 32, buffer=8, penalty=1.0).tolist() == [0.0, 0.0, 0.5, 1.0]
    assert soft_overlong_penalty(lengths, 32, buffer=8, penalty=0.5).tolist() == [0.0, 0.0, 0.25, 0.5]
    assert soft_overlong_penalty(lengths, 32, buffer=0, penalty=1.0).tolist() == [0.0] * 4
