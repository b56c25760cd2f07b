import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from preftune.losses import LOSSES
from preftune.losses.dpo import sigmoid_dpo_loss

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
    assert spec.fn is sigmoid_dpo_loss and spec.needs_reference and spec.paired


def _trl_sigmoid_loss(pc, pr, rc, rr, beta):
    """Run TRL's DPOTrainer._compute_loss on exactly these summed logps.

    A stand-in model returns per-token log-probs with one completion token per row, so TRL's
    sum over tokens equals the given logps; reference logps go in as precomputed values.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    n = pc.numel()
    per_token = torch.cat([pc, pr]).unsqueeze(1)                       # (2B, 1)

    def fake_model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())

    fake_model.training = True
    accelerator = SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    self = SimpleNamespace(
        model=fake_model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        beta=beta, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1, f_alpha_divergence_coef=1.0)
    inputs = {"input_ids": torch.ones(2 * n, 2, dtype=torch.long), "attention_mask": torch.ones(2 * n, 2),
              "completion_mask": T([[0, 1]] * (2 * n)), "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(self, fake_model, inputs, return_outputs=False)
    return loss, self._metrics["train"]


@pytest.mark.oracle
def test_matches_trl_on_identical_tensors():
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-50 * torch.rand(16, generator=g) for _ in range(4))
    worked = (T([-10.0]), T([-15.0]), T([-11.0]), T([-14.0]))
    pc, pr, rc, rr = (torch.cat([x, y]) for x, y in zip((pc, pr, rc, rr), worked))
    for beta in (0.1, 0.5):
        ours = sigmoid_dpo_loss(pc, pr, rc, rr, beta=beta)
        theirs, metrics = _trl_sigmoid_loss(pc, pr, rc, rr, beta)
        assert abs(ours.losses.mean().item() - theirs.item()) < 1e-6
        assert metrics["rewards/chosen"][-1] == pytest.approx(ours.chosen_rewards.mean().item(), abs=1e-6)
        assert metrics["rewards/margins"][-1] == pytest.approx(
            (ours.chosen_rewards - ours.rejected_rewards).mean().item(), abs=1e-6)
    single, _ = _trl_sigmoid_loss(T([-10.0]), T([-15.0]), T([-11.0]), T([-14.0]), 0.1)
    assert single.item() == pytest.approx(0.598139, abs=1e-6)
