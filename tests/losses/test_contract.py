"""Properties every registered loss must have; parametrized over the registry itself."""

import pytest
import torch

from preftune.losses import LOSSES, register_loss

NAMES = sorted(LOSSES)


def _inputs(values, requires_grad=True):
    return [torch.tensor(v, dtype=torch.float32, requires_grad=requires_grad) for v in values]


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_finite_for_extreme_inputs(name):
    spec = LOSSES[name]
    for scale in (1.0, 1e4):
        pc, pr, rc, rr = _inputs([[-1.0 * scale, 0.0, -scale], [-scale, -1.0 * scale, 0.0],
                                  [0.0, -scale, -scale], [-scale, 0.0, -scale]])
        out = spec.fn(pc, pr, rc, rr, beta=0.1)
        for t in out:
            assert t.shape == (3,)
            assert torch.isfinite(t).all(), (name, scale, t)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_policy_inputs_and_rewards_are_detached(name):
    """Reference logps come from a no-grad forward: the loss must still train the policy, and the
    logged rewards must never carry a graph (they are metrics, not objectives)."""
    spec = LOSSES[name]
    pc, pr = _inputs([[-3.0, -4.0], [-5.0, -2.0]])
    rc, rr = _inputs([[-3.5, -4.5], [-4.0, -2.5]], requires_grad=False)
    out = spec.fn(pc, pr, rc, rr, beta=0.1)
    out.losses.sum().backward()
    assert pc.grad is not None and pc.grad.abs().sum() > 0
    assert pr.grad is not None and pr.grad.abs().sum() > 0
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("name", [n for n in NAMES if not LOSSES[n].needs_reference])
def test_reference_free_losses_ignore_reference(name):
    spec = LOSSES[name]
    pc, pr = torch.tensor([-3.0]), torch.tensor([-5.0])
    a = spec.fn(pc, pr, torch.tensor([0.0]), torch.tensor([0.0]), beta=0.1).losses
    b = spec.fn(pc, pr, torch.tensor([-9.0]), torch.tensor([7.0]), beta=0.1).losses
    assert torch.equal(a, b)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_loss("sigmoid", LOSSES["sigmoid"].fn, needs_reference=True, paired=True, summary="x")
