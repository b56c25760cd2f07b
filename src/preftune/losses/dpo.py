"""DPO-family losses on summed completion log-probs. Pure functions: tensors in, tensors out."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import LossOutput

__all__ = ["sigmoid_dpo_loss"]


def sigmoid_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7: -log sigmoid(beta * Delta).

    Delta = (pi_c - ref_c) - (pi_r - ref_r), all inputs summed completion logps of shape (B,).
    Worked example: logps -10, -15 (policy) and -11, -14 (reference), beta 0.1:
    Delta = 1 - (-1) = 2, loss = -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139.
    chosen == rejected gives Delta = 0 and loss = ln 2 with zero gradient.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps        # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    # logsigmoid is the stable form of log(1 / (1 + e^-x)); it stays finite for |x| ~ 1e4
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())
