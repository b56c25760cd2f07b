"""Properties every registered loss must have; parametrized over the registry itself."""

import dataclasses
import math

import pytest
import torch

from preftune.config import LossConfig
from preftune.core.losses import LOSSES, build_loss, register_loss

PAIRED = sorted(n for n, s in LOSSES.items() if s.kind.data == "pairs")  # bt (reward model) too: same signature
UNPAIRED = sorted(n for n, s in LOSSES.items() if s.kind.data == "unpaired")
# rollouts (grpo and its family): test_grpo.py, test_grpo_variants.py; policy gradient (ppo, rloo, reinforce_pp): test_ppo.py; supervised (nll): test_family.py
DEFAULTS = {f.name: f.default for f in dataclasses.fields(LossConfig) if f.default is not dataclasses.MISSING}


def call(spec, pc, pr, rc, rr, **overrides):
    """Call a paired loss the way the loop does: its declared params from the config defaults."""
    kwargs = {p: overrides.get(p, DEFAULTS[p]) for p in spec.params}
    if spec.needs_lengths:
        kwargs["chosen_lengths"] = overrides.get("chosen_lengths", torch.full_like(pc, 4.0))
        kwargs["rejected_lengths"] = overrides.get("rejected_lengths", torch.full_like(pc, 6.0))
    for key in spec.input_keys:  # what the forward computes for the loss alone, at neutral values
        kwargs[key] = overrides.get(key, torch.zeros_like(pc) if "tail" in key else torch.ones_like(pc))
    if spec.state:  # a fresh loop state: what the loss sees at step 1
        kwargs.update(spec.new_state().inputs(pc.device))
    return spec.fn(pc, pr, rc, rr, **kwargs)


def _t(values, requires_grad=False):
    return torch.tensor(values, dtype=torch.float32, requires_grad=requires_grad)


def test_registry_has_the_family():
    assert set(LOSSES) == {"sigmoid", "cdpo", "robust", "hinge", "ipo", "simpo", "orpo", "sft", "kto", "grpo",
                           "nll", "bt", "exo_pair", "nca_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                           "apo_down", "discopop", "f_dpo", "dpop", "cpo", "slic_hf", "ppo", "rloo", "reinforce_pp",
                           "dapo", "bnpo", "dr_grpo", "gspo", "luspo", "cispo", "sapo", "ld_dpo", "wpo", "bco_pair"}
    assert [n for n in sorted(LOSSES) if not LOSSES[n].needs_reference] == ["bt", "cpo", "nll", "orpo", "sft", "simpo",
                                                                            "slic_hf"]
    assert {n: LOSSES[n].kind.name for n in sorted(LOSSES) if LOSSES[n].kind.name != "pairs"} == {
        "bt": "reward_model", "grpo": "rollouts", "kto": "unpaired", "nll": "demonstrations",
        "ppo": "policy_gradient", "reinforce_pp": "policy_gradient", "rloo": "policy_gradient",
        **dict.fromkeys(("dapo", "bnpo", "dr_grpo", "gspo", "luspo", "cispo", "sapo"), "rollouts")}


@pytest.mark.parametrize("name", PAIRED)
def test_shape_and_finite_for_extreme_inputs(name):
    spec = LOSSES[name]
    for scale in (1.0, 1e4):
        pc, pr, rc, rr = (_t(v) for v in ([-scale, 0.0, -scale], [-scale, -scale, 0.0],
                                          [0.0, -scale, -scale], [-scale, 0.0, -scale]))
        out = call(spec, pc, pr, rc, rr)
        for t in (out.losses, out.chosen_rewards, out.rejected_rewards, *out.metrics.values()):
            assert t.shape == (3,)
            assert torch.isfinite(t).all(), (name, scale, t)


@pytest.mark.parametrize("name", PAIRED)
def test_gradients_reach_policy_inputs_and_rewards_are_detached(name):
    """Reference logps come from a no-grad forward: the loss must still train the policy, and the
    logged rewards must never carry a graph (they are metrics, not objectives)."""
    spec = LOSSES[name]
    pc, pr = _t([-3.0, -4.0], True), _t([-5.0, -2.0], True)
    out = call(spec, pc, pr, _t([-3.5, -4.5]), _t([-4.0, -2.5]))
    out.losses.sum().backward()
    assert pc.grad is not None and pc.grad.abs().sum() > 0
    if name != "sft":  # the NLL term ignores the rejected side by definition
        assert pr.grad is not None and pr.grad.abs().sum() > 0
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("name", [n for n in PAIRED if not LOSSES[n].needs_reference])
def test_reference_free_losses_ignore_reference(name):
    spec = LOSSES[name]
    pc, pr = _t([-3.0]), _t([-5.0])
    a = call(spec, pc, pr, _t([0.0]), _t([0.0])).losses
    b = call(spec, pc, pr, _t([-9.0]), _t([7.0])).losses
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["sigmoid", "cdpo", "robust"])
def test_equal_sides_give_ln2(name):
    out = call(LOSSES[name], _t([-4.0]), _t([-4.0]), _t([-3.0]), _t([-3.0]), label_smoothing=0.2)
    assert out.losses.item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("name", ["cdpo", "robust"])
def test_zero_label_smoothing_is_dpo(name):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-20 * torch.rand(8, generator=g) for _ in range(4))
    ours = call(LOSSES[name], pc, pr, rc, rr, label_smoothing=0.0).losses
    assert torch.allclose(ours, call(LOSSES["sigmoid"], pc, pr, rc, rr).losses, atol=1e-7)


def test_beta_to_zero_limit_of_dpo_is_ln2():
    out = call(LOSSES["sigmoid"], _t([-1.0]), _t([-90.0]), _t([-50.0]), _t([-2.0]), beta=1e-9)
    assert out.losses.item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("name", UNPAIRED)
def test_unpaired_contract(name):
    spec = LOSSES[name]
    kwargs = {p: DEFAULTS[p] for p in spec.params}
    for scale in (1.0, 1e4):
        policy = _t([-scale, -2.0, 0.0], True)
        out = spec.fn(policy, _t([0.0, -scale, -scale]), labels=torch.tensor([True, False, True]),
                      policy_kl_logps=_t([-scale, -1.0, -2.0]), reference_kl_logps=_t([-1.0, -scale, -2.0]),
                      **kwargs)
        assert out.losses.shape == out.rewards.shape == (3,)
        assert torch.isfinite(out.losses).all() and torch.isfinite(out.rewards).all()
        out.losses.sum().backward()
        assert torch.isfinite(policy.grad).all() and not out.rewards.requires_grad


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_loss("sigmoid", LOSSES["sigmoid"].fn, kind=LOSSES["sigmoid"].kind, needs_reference=True, summary="x")


def test_mixture_is_the_weighted_sum_and_asks_for_what_its_terms_need():
    """RPO = sigmoid + 0.2 * sft: a reference (from sigmoid) and lengths (from sft)."""
    spec = build_loss("sigmoid", [["sigmoid", 1.0], ["sft", 0.2]])
    assert spec.needs_reference and spec.needs_lengths and spec.kind.name == "pairs"
    pc, pr, rc, rr = _t([-10.0]), _t([-15.0]), _t([-11.0]), _t([-14.0])
    out = call(spec, pc, pr, rc, rr, chosen_lengths=_t([5.0]))
    # 0.598139 + 0.2 * (10 / 5) = 0.998139
    assert out.losses.item() == pytest.approx(0.998139, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1)
    assert out.metrics["loss/sft"].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="only losses of a mixable kind"):
        build_loss("sigmoid", [["sigmoid", 1.0], ["kto", 1.0]])
