"""DPO-family losses on summed completion log-probs. Pure functions: tensors in, tensors out.

All take the four (B,) tensors `policy_chosen_logps, policy_rejected_logps,
reference_chosen_logps, reference_rejected_logps` and keyword parameters. Delta below is
(pi_c - ref_c) - (pi_r - ref_r); rewards are beta * (pi - ref), detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import LossOutput

__all__ = ["sigmoid_dpo_loss", "cdpo_loss", "robust_dpo_loss", "hinge_loss", "ipo_loss"]


def _logratios(pc, pr, rc, rr):
    return pc - rc, pr - rr  # (B,), (B,)


def _output(losses, chosen_logratios, rejected_logratios, beta) -> LossOutput:
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def sigmoid_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                     reference_rejected_logps, *, beta: float) -> LossOutput:
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7: -log sigmoid(beta * Delta).

    Worked example: logps -10, -15 (policy) and -11, -14 (reference), beta 0.1:
    Delta = 1 - (-1) = 2, loss = -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139.
    chosen == rejected gives Delta = 0 and loss = ln 2 with zero gradient.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    # logsigmoid is the stable form of log(1 / (1 + e^-x)); it stays finite for |x| ~ 1e4
    return _output(-F.logsigmoid(beta * (c - r)), c, r, beta)


def cdpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
              *, beta: float, label_smoothing: float) -> LossOutput:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"), eps = label_smoothing:

        -(1 - eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta)

    i.e. DPO with labels flipped with probability eps. eps = 0 is exactly sigmoid DPO.
    Example (Delta = 2, beta 0.1, eps 0.1): 0.9 * 0.598139 + 0.1 * 0.798139 = 0.618139.
    Note: TRL >= 0.29 ignores label_smoothing in its sigmoid loss; this is the <= 0.28 /
    OpenRLHF / reference-implementation formula.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    z = beta * (c - r)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return _output(losses, c, r, beta)


def robust_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    *, beta: float, label_smoothing: float) -> LossOutput:
    """Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409), Eq. 8: an unbiased loss under
    label-flip rate eps:  [-(1 - eps) log sigmoid(beta Delta) + eps log sigmoid(-beta Delta)] / (1 - 2 eps).

    Example (Delta = 2, beta 0.1, eps 0.1): (0.9 * 0.598139 - 0.1 * 0.798139) / 0.8 = 0.573139.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    z = beta * (c - r)
    losses = (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)
    return _output(losses, c, r, beta)


def hinge_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
               *, beta: float) -> LossOutput:
    """SLiC-HF hinge (Zhao et al. 2023, arXiv 2305.10425, Eq. 2) on DPO log-ratios, as in RSO
    (Liu et al. 2023): relu(1 - beta * Delta). Example (Delta = 2, beta 0.1): 0.8."""
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return _output(torch.relu(1 - beta * (c - r)), c, r, beta)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             *, beta: float, ipo_length_normalize: bool, chosen_lengths, rejected_lengths) -> LossOutput:
    """IPO, Azar et al. 2023 (arXiv 2310.12036), Eq. 17: (h - 1/(2 beta))^2.

    h = Delta on summed log-probs by default (the paper's formula as written; OpenRLHF and the
    DPO reference implementation). With `ipo_length_normalize` each side's log-ratio is divided
    by its completion length first (TRL's offline IPO). The minimum, loss 0, sits at the
    target margin h = 1/(2 beta) (= 5 at beta 0.1).
    Examples (logps -10/-15 vs -11/-14, beta 0.1): summed h = 2 -> (2 - 5)^2 = 9.0;
    normalized with |y_w| = 5, |y_l| = 6: h = 1/5 + 1/6 = 0.366667 -> 21.467778.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    if ipo_length_normalize:
        c, r = c / chosen_lengths.clamp(min=1), r / rejected_lengths.clamp(min=1)
    return _output((c - r - 1 / (2 * beta)) ** 2, c, r, beta)
