"""The rest of the GRPO family on the same inputs as `grpo_loss`: per-token log-probs of sampled
completions (N, K), the sampling policy's (`old_logps`), the reference's (or None), one group
advantage per completion (N,) and the completion mask (N, K). Pure functions; each returns a
RolloutLossOutput whose per-completion losses average to the micro-batch loss, and shares the
truncated-IS weight, the k3 KL term, the reductions and the metrics through
`grpo.rollout_output`. What differs between them is the policy term and the reduction:

| loss    | importance ratio            | policy term                              | reduction  |
|---------|-----------------------------|------------------------------------------|------------|
| dapo    | per token                   | clipped (eps_low, eps_high)              | token      |
| bnpo    | per token                   | clipped                                  | token      |
| dr_grpo | per token                   | clipped                                  | constant   |
| gspo    | per completion (length-avg) | clipped per completion                   | sequence   |
| luspo   | per completion (length-avg) | clipped per completion                   | sum        |
| cispo   | per token                   | sg(clip(ratio)) * A * log p              | token      |
| sapo    | per token                   | soft gate (4 / tau) sigmoid(tau (r - 1)) | sequence   |

Where the papers' defaults differ from GRPO's (DAPO's eps_high 0.28 and no KL, GSPO's clip range
of 3e-4 / 4e-4), the loss's recipe (core/recipes/<name>.yaml) sets them; the functions take every
setting as a keyword.
"""

from __future__ import annotations

import torch

from .grpo import RolloutLossOutput, grpo_loss, rollout_output

__all__ = ["dapo_loss", "bnpo_loss", "dr_grpo_loss", "gspo_loss", "luspo_loss", "cispo_loss", "sapo_loss",
           "sequence_log_ratio"]


def dapo_loss(policy_logps, old_logps, reference_logps, advantages, mask, *, clip_epsilon: float,
              clip_epsilon_high: float, kl_coef: float, tis_cap: float = 0.0,
              sampler_logps=None) -> RolloutLossOutput:
    """DAPO (Yu et al. 2025, arXiv 2503.14476): GRPO's clipped objective with decoupled
    bounds clip(r, 1 - eps_low, 1 + eps_high) ("clip-higher", the paper's 0.2 / 0.28) and a
    token-level mean, 1 / sum_i |o_i| * sum_i sum_t, so a long completion weighs in proportion
    to its tokens; the paper drops the KL term (kl_coef 0 in its recipe). Dynamic sampling and
    the overlong filter and punishment are the batch source's (runs/online/grpo.py), switched on
    by the loss settings `dynamic_sampling`, `overlong_filter`, `overlong_buffer`.

    The token mean is over one micro-batch: with gradient accumulation the paper's mean over the
    whole batch of samples becomes a mean of per-micro-batch means.
    """
    return grpo_loss(policy_logps, old_logps, reference_logps, advantages, mask, clip_epsilon=clip_epsilon,
                     clip_epsilon_high=clip_epsilon_high, kl_coef=kl_coef, grpo_token_level=True, tis_cap=tis_cap,
                     sampler_logps=sampler_logps)


def bnpo_loss(policy_logps, old_logps, reference_logps, advantages, mask, *, clip_epsilon: float,
              clip_epsilon_high: float, kl_coef: float, tis_cap: float = 0.0,
              sampler_logps=None) -> RolloutLossOutput:
    """TRL's loss_type "bnpo": GRPO's clipped objective with the token sum of the micro-batch
    divided by its token count (the same function as dapo, with GRPO's defaults). The name is
    TRL's; the BNPO paper's Beta-distribution reward normalisation (Xiao et al. 2025) is not this."""
    return grpo_loss(policy_logps, old_logps, reference_logps, advantages, mask, clip_epsilon=clip_epsilon,
                     clip_epsilon_high=clip_epsilon_high, kl_coef=kl_coef, grpo_token_level=True, tis_cap=tis_cap,
                     sampler_logps=sampler_logps)


def _clipped(ratio, advantages, clip_epsilon, clip_epsilon_high):
    """-min(r A, clip(r, 1 - eps, 1 + eps_high) A) and where the clip is what the min took."""
    high = clip_epsilon_high or clip_epsilon
    unclipped, clipped = ratio * advantages, torch.clamp(ratio, 1 - clip_epsilon, 1 + high) * advantages
    return -torch.min(unclipped, clipped), clipped < unclipped


def dr_grpo_loss(policy_logps, old_logps, reference_logps, advantages, mask, *, clip_epsilon: float,
                 clip_epsilon_high: float, kl_coef: float, dr_grpo_tokens: int, tis_cap: float = 0.0,
                 sampler_logps=None) -> RolloutLossOutput:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training", arXiv 2503.20783):
    GRPO without its two length and difficulty biases. The token sum of each completion is not
    divided by its length but by one constant for all (the generation budget, `dr_grpo_tokens`;
    0 = the mask's width; `preftune grpo` fills in online.max_new_tokens), so the loss is
    sum_i sum_t L_t / (N * L_max); and the advantages are not divided by the group's std
    (online.scale_rewards=false, the source's setting).

    Example: two completions of 4 and 1 tokens, A = 1 and 3, ratio 1, L_max 8:
    (4 * -1 + 1 * -3) / (2 * 8) = -0.4375.
    """
    ratio = torch.exp(policy_logps - old_logps.detach())
    adv = advantages.to(policy_logps.dtype).unsqueeze(1)
    per_token, was_clipped = _clipped(ratio, adv, clip_epsilon, clip_epsilon_high)
    return rollout_output(per_token, policy_logps, old_logps, reference_logps, mask, kl_coef=kl_coef,
                          reduction="constant", constant=float(dr_grpo_tokens), ratio=ratio, was_clipped=was_clipped,
                          tis_cap=tis_cap, sampler_logps=sampler_logps)


def sequence_log_ratio(policy_logps, old_logps, mask) -> torch.Tensor:
    """GSPO's log s_i = (1 / |y_i|) sum_t (log pi(y_t) - log pi_old(y_t)), shape (N, 1): the
    length-normalised sequence log-ratio, with the gradient flowing to every token."""
    mask = mask.to(policy_logps.dtype)
    return (((policy_logps - old_logps.detach()) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).unsqueeze(1)


def gspo_loss(policy_logps, old_logps, reference_logps, advantages, mask, *, clip_epsilon: float,
              clip_epsilon_high: float, kl_coef: float, tis_cap: float = 0.0,
              sampler_logps=None) -> RolloutLossOutput:
    """GSPO (Zheng et al. 2025, "Group sequence policy optimization", arXiv 2507.18071):
    one importance ratio per completion, s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|), clipped per
    completion: L_i = -min(s_i A_i, clip(s_i, 1 - eps, 1 + eps_high) A_i), averaged over the
    completions. A completion is clipped whole or not at all, so one off-policy token cannot
    swing a token-level ratio; the paper's clip range is narrow (3e-4 / 4e-4, its recipe).
    The k3 KL term (kl_coef > 0) is added per token and averaged per completion, as in grpo.

    Example: a completion of two tokens with log-ratios 0.1 and 0.3, A = 1, eps 0.2:
    s = e^0.2 = 1.2214 > 1.2, clipped: L = -1.2, and no gradient.
    """
    log_s = sequence_log_ratio(policy_logps, old_logps, mask)
    s = torch.exp(log_s)
    adv = advantages.to(policy_logps.dtype).unsqueeze(1)
    per_seq, was_clipped = _clipped(s, adv, clip_epsilon, clip_epsilon_high)  # (N, 1)
    return rollout_output(per_seq, policy_logps, old_logps, reference_logps, mask, kl_coef=kl_coef,
                          reduction="sequence", ratio=s, was_clipped=was_clipped, tis_cap=tis_cap,
                          sampler_logps=sampler_logps)


def luspo_loss(policy_logps, old_logps, reference_logps, advantages, mask, *, clip_epsilon: float,
               clip_epsilon_high: float, kl_coef: float, tis_cap: float = 0.0,
               sampler_logps=None) -> RolloutLossOutput:
    """LUSPO (Liu et al. 2026, "Length-unbiased sequence policy optimization", arXiv 2602.05261): GSPO's clipped
    sequence-level term scaled by the completion's length |y_i| (its token sum instead of its
    token mean), so that long completions are not under-weighted against short ones; the mean
    over completions. Example: GSPO's per-completion value -1.2 on a 2-token completion is -2.4.
    """
    log_s = sequence_log_ratio(policy_logps, old_logps, mask)
    s = torch.exp(log_s)
    adv = advantages.to(policy_logps.dtype).unsqueeze(1)
    per_seq, was_clipped = _clipped(s, adv, clip_epsilon, clip_epsilon_high)
    return rollout_output(per_seq, policy_logps, old_logps, reference_logps, mask, kl_coef=kl_coef,
                          reduction="sum", ratio=s, was_clipped=was_clipped, tis_cap=tis_cap,
                          sampler_logps=sampler_logps)


def cispo_loss(policy_logps, old_logps, reference_logps, advantages, mask, *, cispo_weight_min: float,
               cispo_weight_max: float, kl_coef: float, tis_cap: float = 0.0,
               sampler_logps=None) -> RolloutLossOutput:
    """CISPO (MiniMax 2025, "MiniMax-M1", arXiv 2506.13585): the importance weight is
    clipped and detached, and multiplies the advantage-weighted log-prob,

        L_t = -sg(clip(r_t, w_min, w_max)) * A * log pi(y_t),   r_t = pi(y_t) / pi_old(y_t),

    averaged over every completion token of the micro-batch. Unlike PPO's clip, which zeroes the
    gradient of a token whose ratio left the trust region, every token keeps a gradient
    (sg(w) A grad log pi): the rare, high-ratio "fork" tokens of long reasoning still learn. The
    paper leaves the weight without a lower bound (`cispo_weight_min` 0) and caps it above.

    Example: ratio e^0.5 = 1.6487 at one token, cap 1.2, A = 1, log pi = -0.5: the loss is
    -1.2 * -0.5 = 0.6 and its gradient in log pi is -1.2 (not 0, as PPO's clip would give).
    """
    ratio = torch.exp(policy_logps - old_logps.detach())
    weight = torch.clamp(ratio, min=cispo_weight_min, max=cispo_weight_max).detach()
    adv = advantages.to(policy_logps.dtype).unsqueeze(1)
    was_clipped = (ratio > cispo_weight_max) | (ratio < cispo_weight_min)
    return rollout_output(-weight * adv * policy_logps, policy_logps, old_logps, reference_logps, mask,
                          kl_coef=kl_coef, reduction="token", ratio=ratio, was_clipped=was_clipped, tis_cap=tis_cap,
                          sampler_logps=sampler_logps)


def sapo_loss(policy_logps, old_logps, reference_logps, advantages, mask, *, sapo_temperature_pos: float,
              sapo_temperature_neg: float, kl_coef: float, tis_cap: float = 0.0,
              sampler_logps=None) -> RolloutLossOutput:
    """SAPO (Gao et al. 2025, "Soft adaptive policy optimization", arXiv 2511.20347): the hard
    clip is replaced by a smooth gate of the token ratio,

        L_t = -f(r_t) A,   f(r) = (4 / tau) sigmoid(tau (r - 1)),

    with tau = `sapo_temperature_pos` for A > 0 and `sapo_temperature_neg` otherwise (the paper
    makes negative tokens decay faster). f has slope 1 at r = 1 (on-policy it is the policy
    gradient) and flattens away from it, so off-policy tokens are damped, never cut off.
    Reduction: each completion's token mean, then the mean (GRPO's).

    Example: r = 1, A = 2, any tau: f = 2 / tau, L = -4 / tau; at tau 1, -4.
    """
    ratio = torch.exp(policy_logps - old_logps.detach())
    adv = advantages.to(policy_logps.dtype).unsqueeze(1)
    tau = torch.where(adv > 0, torch.full_like(adv, sapo_temperature_pos), torch.full_like(adv, sapo_temperature_neg))
    per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    return rollout_output(per_token, policy_logps, old_logps, reference_logps, mask, kl_coef=kl_coef,
                          reduction="sequence", ratio=ratio, was_clipped=torch.zeros_like(ratio, dtype=torch.bool),
                          tis_cap=tis_cap, sampler_logps=sampler_logps)
