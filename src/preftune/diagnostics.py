"""Standard per-step metrics, as pure functions of tensors already computed by the loop.

Keys follow the DPO reference / TRL names so dashboards carry over.
"""

from __future__ import annotations

import torch

__all__ = ["step_metrics"]


def _mean(x: torch.Tensor) -> float:
    return x.float().mean().item() if x.numel() else float("nan")


def step_metrics(parts: dict[str, torch.Tensor], *, paired: bool) -> dict[str, float]:
    """`parts` holds per-example tensors gathered over one optimizer step (see train.loss_forward).

    Paired: rewards/accuracies is the fraction of pairs with a positive margin. Unpaired (KTO):
    rewards/chosen and rewards/rejected average over desirable and undesirable examples, and
    the margin is their difference. Loss-specific extras (e.g. `kl`, `orpo/log_odds_ratio`)
    are averaged under their own names.
    """
    if paired:
        margins = parts["chosen_rewards"] - parts["rejected_rewards"]
        row = {
            "loss": _mean(parts["losses"]),
            "rewards/chosen": _mean(parts["chosen_rewards"]),
            "rewards/rejected": _mean(parts["rejected_rewards"]),
            "rewards/margins": _mean(margins),
            "rewards/accuracies": _mean(margins > 0),
            "logps/chosen": _mean(parts["policy_chosen"]),
            "logps/rejected": _mean(parts["policy_rejected"]),
            "lengths/chosen": _mean(parts["chosen_lengths"]),
            "lengths/rejected": _mean(parts["rejected_lengths"]),
        }
        standard = {"losses", "chosen_rewards", "rejected_rewards", "policy_chosen", "policy_rejected",
                    "chosen_lengths", "rejected_lengths"}
    else:
        good = parts["labels"].bool()
        chosen, rejected = _mean(parts["rewards"][good]), _mean(parts["rewards"][~good])
        row = {
            "loss": _mean(parts["losses"]),
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "logps/chosen": _mean(parts["policy"][good]),
            "logps/rejected": _mean(parts["policy"][~good]),
            "lengths/chosen": _mean(parts["lengths"][good]),
            "lengths/rejected": _mean(parts["lengths"][~good]),
            "examples/desirable": int(good.sum()),
            "examples/undesirable": int((~good).sum()),
        }
        standard = {"losses", "rewards", "labels", "policy", "lengths"}
    row.update({k: _mean(v) for k, v in parts.items() if k not in standard})
    return row
