"""KTO on unpaired (prompt, completion, desirable?) data."""

from __future__ import annotations

import torch

from .types import UnpairedLossOutput

__all__ = ["kto_loss"]


def kto_loss(policy_logps, reference_logps, *, labels, policy_kl_logps, reference_kl_logps, beta: float,
             desirable_weight: float, undesirable_weight: float) -> UnpairedLossOutput:
    """KTO, Ethayarajh et al. 2024 (arXiv 2402.01306), Eq. 8:

        r = log pi(y|x) - log pi_ref(y|x);   z0 = max(0, mean over the batch of KL rows) (no gradient)
        desirable:   w_d * (1 - sigmoid(beta (r - z0)))
        undesirable: w_u * (1 - sigmoid(beta (z0 - r)))

    The KL rows pair each prompt with another example's completion (mismatched), so
    log pi(y'|x) - log pi_ref(y'|x) estimates KL(pi || pi_ref) without the example's own signal.
    All tensors are (N,); `labels` is bool (True = desirable).
    Example: r = 1, z0 = 0.5, beta 0.1 -> desirable 1 - sigmoid(0.05) = 0.487503,
    undesirable 1 - sigmoid(-0.05) = 0.512497.
    """
    z0 = (policy_kl_logps - reference_kl_logps).mean().clamp(min=0).detach()
    r = policy_logps - reference_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    losses = torch.where(labels.bool(), desirable, undesirable)
    return UnpairedLossOutput(losses, beta * r.detach(), {"kl": z0})
