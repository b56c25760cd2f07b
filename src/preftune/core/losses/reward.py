"""Reward-model losses: pure functions of the scores a sequence-classification head gives the
chosen and rejected completions (`preftune train-rm`)."""

from __future__ import annotations

import torch.nn.functional as F

from .types import LossOutput

__all__ = ["bradley_terry_loss"]


def bradley_terry_loss(chosen_scores, rejected_scores, reference_chosen, reference_rejected, *,
                       rm_margin: float = 0.0, rm_center_coef: float = 0.0) -> LossOutput:
    """-log sigmoid(r_c - r_r - m) + c * (r_c + r_r)^2 per pair (Bradley-Terry; Ouyang et al. 2022).

    `rm_margin` m asks for a gap of at least m between the two scores before the loss flattens
    (Llama 2's margin, here one constant for every pair). `rm_center_coef` c pulls the scores of
    a pair towards a sum of 0: BT alone fixes score differences only, so without it the offset
    drifts freely (Eisenstein et al. 2023 call this centering). The reference arguments are
    unused (the loop passes zeros: a reward model has no reference). Rewards logged are the scores.
    """
    losses = -F.logsigmoid(chosen_scores - rejected_scores - rm_margin)
    if rm_center_coef:
        losses = losses + rm_center_coef * (chosen_scores + rejected_scores) ** 2
    return LossOutput(losses, chosen_scores.detach(), rejected_scores.detach())
