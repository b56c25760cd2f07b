"""Standard per-step metrics, as pure functions of tensors already computed by the loop.

Keys follow the DPO reference / TRL names so dashboards carry over.
"""

from __future__ import annotations

import torch

__all__ = ["step_metrics"]


def step_metrics(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                 policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                 chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor) -> dict[str, float]:
    """All inputs are per-pair tensors of shape (B,) gathered over one optimizer step."""
    margins = chosen_rewards - rejected_rewards
    return {
        "loss": losses.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "logps/chosen": policy_chosen_logps.mean().item(),
        "logps/rejected": policy_rejected_logps.mean().item(),
        "lengths/chosen": chosen_lengths.float().mean().item(),
        "lengths/rejected": rejected_lengths.float().mean().item(),
    }
