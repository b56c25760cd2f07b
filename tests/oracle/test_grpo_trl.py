"""TRL as the oracle for GRPO: `GRPOTrainer._compute_loss` on exactly our per-token log-probs.

A stand-in trainer hands TRL the per-token log-probs we give it (its model call is replaced),
with old and reference log-probs as precomputed inputs, so both sides compute the loss from the
same tensors. Definitions that match: TRL's loss_type "grpo" is our default reduction (each
completion's token mean, then the mean over completions), "bnpo" is `loss.grpo_token_level=true`
on one micro-batch; the clip (epsilon_low/epsilon_high) and the k3 KL with coefficient beta are
the same. TRL's default "dapo" normalises by the tokens of the whole accumulated generation
batch: our `dapo` loss equals it when that batch is one micro-batch (checked below with the rest
of the family); our advantages use the sample std like TRL's scale_rewards="group".
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from preftune.core.losses import group_advantages
from preftune.core.losses.grpo import grpo_loss

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.oracle


def trl_grpo(per_token, old, ref, advantages, mask, *, loss_type, beta, eps_low, eps_high, level="token",
             max_completion_length=None, sapo_pos=1.0, sapo_neg=1.05):
    from trl.trainer.grpo_trainer import GRPOTrainer

    def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kw):
        return per_token, torch.zeros_like(per_token), None

    reduce = lambda x, reduction="sum": x  # noqa: E731 - one process
    self = SimpleNamespace(
        _get_per_token_logps_and_entropies=logps_and_entropies, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        max_completion_length=max_completion_length or per_token.size(1),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1,
                             sapo_temperature_pos=sapo_pos, sapo_temperature_neg=sapo_neg),
        loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=reduce,
                                    num_processes=1))
    n, k = per_token.shape
    inputs = {"prompt_ids": torch.ones(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.ones(n, k, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}  # dapo/cispo: the tokens of the whole (here: this) batch
    return GRPOTrainer._compute_loss(self, None, inputs), self._metrics["train"]


def _tensors(seed=0, n=8, k=6):
    g = torch.Generator().manual_seed(seed)
    per_token = (-3 * torch.rand(n, k, generator=g)).requires_grad_(True)
    old = per_token.detach() + 0.8 * (torch.rand(n, k, generator=g) - 0.5)  # ratios in e^[-0.4, 0.4]: some clip
    ref = per_token.detach() - 0.3 * torch.rand(n, k, generator=g)
    lengths = torch.randint(1, k + 1, (n,), generator=g)
    mask = (torch.arange(k)[None, :] < lengths[:, None]).float()
    rewards = torch.randint(0, 2, (n,), generator=g).float()
    return per_token, old, ref, group_advantages(rewards, 4), mask


@pytest.mark.parametrize("trl_type, token_level", [("grpo", False), ("bnpo", True)])
@pytest.mark.parametrize("beta, eps_high", [(0.0, 0.2), (0.04, 0.2), (0.5, 0.28)])
def test_grpo_loss_and_gradient_equal_trl(trl_type, token_level, beta, eps_high):
    for seed in range(3):
        per_token, old, ref, adv, mask = _tensors(seed)
        theirs, metrics = trl_grpo(per_token, old, ref, adv, mask, loss_type=trl_type, beta=beta, eps_low=0.2,
                                   eps_high=eps_high)
        (want,) = torch.autograd.grad(theirs, per_token)
        out = grpo_loss(per_token, old, ref, adv, mask, clip_epsilon=0.2, clip_epsilon_high=eps_high, kl_coef=beta,
                        grpo_token_level=token_level)
        ours = out.losses.mean()
        (got,) = torch.autograd.grad(ours, per_token)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-6), (seed, ours.item(), theirs.item())
        assert torch.allclose(got, want, atol=1e-7), (got - want).abs().max()
        if beta:  # the same KL: token-weighted mean over the micro-batch
            kl_tokens = (out.metrics["kl"] * mask.sum(1)).sum() / mask.sum()
            assert kl_tokens.item() == pytest.approx(metrics["kl"][0], abs=1e-6)
        clipped = (out.metrics["clipped"] * mask.sum(1)).sum() / mask.sum()
        assert clipped.item() == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
        assert clipped.item() > 0 or seed  # the clip binds somewhere in these tensors


def test_trl_advantages_are_ours():
    """TRL's scale_rewards="group": (r - group mean) / (sample std + 1e-4), via its nanstd."""
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 0.0])
    grouped = rewards.view(-1, 4)
    theirs = (grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1).unsqueeze(1) + 1e-4)
    assert torch.allclose(group_advantages(rewards, 4), theirs.reshape(-1), atol=1e-7)


# ---- the rest of the family (core/losses/grpo_variants.py) on the same tensors ----
# Each case: our loss and its settings, then TRL's loss_type, importance-sampling level and the
# settings that make it the same function. TRL's dapo and cispo divide by the tokens of the whole
# generation batch (`num_items_in_batch`), which is one micro-batch here.
FAMILY = [
    ("dapo", {"clip_epsilon": 0.2, "clip_epsilon_high": 0.28}, dict(loss_type="dapo", eps_low=0.2, eps_high=0.28)),
    ("bnpo", {"clip_epsilon": 0.2, "clip_epsilon_high": 0.0}, dict(loss_type="bnpo", eps_low=0.2, eps_high=0.2)),
    ("dr_grpo", {"clip_epsilon": 0.2, "clip_epsilon_high": 0.0, "dr_grpo_tokens": 0},
     dict(loss_type="dr_grpo", eps_low=0.2, eps_high=0.2)),  # 0: the mask's width, TRL's max_completion_length here
    ("dr_grpo", {"clip_epsilon": 0.2, "clip_epsilon_high": 0.28, "dr_grpo_tokens": 10},
     dict(loss_type="dr_grpo", eps_low=0.2, eps_high=0.28, max_completion_length=10)),
    ("gspo", {"clip_epsilon": 0.05, "clip_epsilon_high": 0.08},
     dict(loss_type="grpo", eps_low=0.05, eps_high=0.08, level="sequence")),
    ("gspo", {"clip_epsilon": 3e-4, "clip_epsilon_high": 4e-4},
     dict(loss_type="grpo", eps_low=3e-4, eps_high=4e-4, level="sequence")),
    ("luspo", {"clip_epsilon": 0.05, "clip_epsilon_high": 0.08},
     dict(loss_type="luspo", eps_low=0.05, eps_high=0.08, level="sequence")),
    ("cispo", {"cispo_weight_min": 0.0, "cispo_weight_max": 1.1},
     dict(loss_type="cispo", eps_low=0.2, eps_high=1.1)),  # TRL's epsilon_high is the weight cap itself for cispo
    ("cispo", {"cispo_weight_min": 0.0, "cispo_weight_max": 5.0}, dict(loss_type="cispo", eps_low=0.2, eps_high=5.0)),
    ("sapo", {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05}, dict(loss_type="sapo", eps_low=0.2,
                                                                                eps_high=0.2)),
    ("sapo", {"sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0},
     dict(loss_type="sapo", eps_low=0.2, eps_high=0.2, sapo_pos=0.5, sapo_neg=2.0)),
]
# What TRL checks in this file, by loss (a literal: docs/generate.py reads it for the method table)
ORACLE = {"grpo": "loss and gradient", "dapo": "loss and gradient", "bnpo": "loss and gradient",
          "dr_grpo": "loss and gradient", "gspo": "loss and gradient", "luspo": "loss and gradient",
          "cispo": "loss and gradient", "sapo": "loss and gradient"}


def test_the_oracle_list_is_what_this_file_compares():
    assert set(ORACLE) == {"grpo", *(name for name, _, _ in FAMILY)}


@pytest.mark.parametrize("name, ours_settings, theirs", FAMILY, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(FAMILY)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_the_grpo_family_equals_trl(name, ours_settings, theirs, beta):
    from preftune.core.losses import LOSSES

    for seed in range(3):
        per_token, old, ref, adv, mask = _tensors(seed)
        loss, _ = trl_grpo(per_token, old, ref, adv, mask, beta=beta, **theirs)
        (want,) = torch.autograd.grad(loss, per_token)
        out = LOSSES[name].fn(per_token, old, ref, adv, mask, kl_coef=beta, **ours_settings)
        ours = out.losses.mean()
        (got,) = torch.autograd.grad(ours, per_token)
        assert ours.item() == pytest.approx(loss.item(), abs=1e-6), (seed, ours.item(), loss.item())
        assert torch.allclose(got, want, atol=1e-7), (got - want).abs().max()
