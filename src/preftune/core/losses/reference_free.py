"""Losses that need no reference model: SimPO, ORPO, CPO, SLiC-HF and the SFT/NLL term.

They take the same four-tensor signature as the DPO family so one loop serves all, and never
read the reference tensors (the loop passes zeros and never loads a reference for them).
Average log-probs are a_w = logps_w / |y_w| (per-token mean over completion tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import LossOutput, SupervisedLossOutput

__all__ = ["simpo_loss", "orpo_loss", "cpo_loss", "slic_hf_loss", "sft_loss"]


def _avg(logps, lengths):
    return logps / lengths.clamp(min=1)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
               *, beta: float, simpo_gamma: float, chosen_lengths, rejected_lengths) -> LossOutput:
    """SimPO, Meng et al. 2024 (arXiv 2405.14734), Eq. 6: -log sigmoid(beta (a_w - a_l) - gamma).

    Worked example (beta 2, gamma 0.5): a_w = -45/90 = -0.5, a_l = -36/60 = -0.6,
    2 * 0.1 - 0.5 = -0.3, loss = log(1 + e^0.3) = 0.854355. Rewards are beta * a.
    TRL writes the same value as beta (a_w - a_l - gamma/beta) and adds cpo_alpha * NLL by
    default; here the NLL is a separate `sft` term in a mixture.
    """
    aw, al = _avg(policy_chosen_logps, chosen_lengths), _avg(policy_rejected_logps, rejected_lengths)
    losses = -F.logsigmoid(beta * (aw - al) - simpo_gamma)
    return LossOutput(losses, beta * aw.detach(), beta * al.detach())


def _log_odds(avg_logps):
    """log(p / (1 - p)) for p = exp(avg_logps) < 1, computed stably as a - log(1 - e^a)."""
    # clamp keeps p strictly below 1 where a rounds to 0 (a single, certain token)
    avg_logps = avg_logps.clamp(max=-1e-6)
    return avg_logps - torch.log(-torch.expm1(avg_logps))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
              *, beta: float, chosen_lengths, rejected_lengths) -> LossOutput:
    """ORPO, Hong et al. 2024 (arXiv 2403.07691), Eqs. 6-7, with lambda = beta:

        L = -a_w - beta * log sigmoid(log odds(y_w) - log odds(y_l)),  odds(y) = p / (1 - p), p = e^{a}.

    The NLL is per sequence (-a_w), averaged over the batch by the loop; TRL uses the batch
    token-mean instead (equal when lengths are equal). Example: a_w = -0.5, a_l = -1.0,
    beta 0.1: log odds = -0.5 - log(1 - e^-0.5) = 0.432752 and -1 - log(1 - e^-1) = -0.541325;
    ratio term -log sigmoid(0.974077) = 0.320300; loss = 0.5 + 0.0320300 = 0.532030.
    Rewards are beta * a; `orpo/log_odds_ratio` is logged.
    """
    aw, al = _avg(policy_chosen_logps, chosen_lengths), _avg(policy_rejected_logps, rejected_lengths)
    ratio = _log_odds(aw) - _log_odds(al)
    losses = -aw - beta * F.logsigmoid(ratio)
    return LossOutput(losses, beta * aw.detach(), beta * al.detach(), {"orpo/log_odds_ratio": ratio.detach()})


def cpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             *, beta: float, cpo_alpha: float, chosen_lengths, rejected_lengths) -> LossOutput:
    """CPO, Xu et al. 2024 (arXiv 2401.08417): L_prefer (Eq. 3) + alpha * L_NLL, i.e.

        -log sigmoid(beta (pi_c - pi_r)) - alpha * a_w

    DPO with a uniform reference (so none is loaded) on summed log-probs, plus the NLL of the
    chosen completion that keeps the policy on the preferred data (the paper's weight is 1).
    The NLL is per sequence and length-normalized (-a_w, as in `sft` and `orpo`); TRL's
    CPOTrainer takes the batch token-mean instead (equal when chosen lengths are equal).
    cpo_alpha = 0 leaves the preference term alone. Example: pi -10 / -15, |y_w| = 5, beta 0.1:
    -log sigmoid(0.5) = 0.474077; NLL 10 / 5 = 2; loss 2.474077. Rewards are beta * pi;
    `cpo/nll` is logged.
    """
    nll = -_avg(policy_chosen_logps, chosen_lengths)
    losses = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps)) + cpo_alpha * nll
    return LossOutput(losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach(),
                      {"cpo/nll": nll.detach()})


def slic_hf_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 *, slic_delta: float, slic_lambda: float) -> LossOutput:
    """SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425), the calibration loss with its regularizer,
    the regularization target being the chosen completion:

        max(0, delta - log P(y_w|x) + log P(y_l|x)) - lambda * log P(y_w|x)

    on summed (sequence) log-likelihoods of the policy, no reference. The hinge stops pushing a
    pair once the chosen completion is delta nats likelier than the rejected one; the NLL term
    keeps the chosen likelihood from falling meanwhile. `hinge` is the same hinge on DPO's
    log-ratios (RSO), without the NLL. Example: delta 1, lambda 0.1, pi -10 / -9.5:
    max(0, 1 + 10 - 9.5) + 0.1 * 10 = 1.5 + 1.0 = 2.5 (with pi_r = -15 the hinge is 0: 1.0).
    Rewards are the log-likelihoods pi themselves: what SLiC calibrates.
    """
    hinge = torch.relu(slic_delta - policy_chosen_logps + policy_rejected_logps)
    losses = hinge - slic_lambda * policy_chosen_logps
    return LossOutput(losses, policy_chosen_logps.detach(), policy_rejected_logps.detach())


def sft_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             *, chosen_lengths, rejected_lengths) -> LossOutput:
    """NLL of the chosen completion, per sequence and length-normalized: -a_w.

    The RPO term (Pang et al. 2024, arXiv 2404.19733, Eq. 3) when mixed with DPO, e.g.
    `loss.mix=[[sigmoid, 1.0], [sft, 0.2]]`. Rewards logged are the average log-probs.
    """
    aw, al = _avg(policy_chosen_logps, chosen_lengths), _avg(policy_rejected_logps, rejected_lengths)
    return LossOutput(-aw, aw.detach(), al.detach())


def nll_loss(policy_logps, lengths) -> SupervisedLossOutput:
    """Supervised fine-tuning: the mean NLL over every completion token of the micro-batch.

    `policy_logps` (N,) are summed completion log-probs, `lengths` (N,) their token counts.
    Per-example losses are -logp_i / mean(lengths), so their mean is -sum(logp) / sum(lengths):
    each token weighs the same (long answers are not down-weighted), as SFT trainers usually do.
    """
    scale = lengths.float().mean().clamp(min=1.0)
    return SupervisedLossOutput(-policy_logps / scale)
