"""GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300) on per-token log-probs of sampled
completions. Pure functions: tensors in, tensors out.

A group is the G completions sampled for one prompt; `group_advantages` turns their rewards into
advantages, `grpo_loss` is the clipped policy-ratio objective over completion tokens with an
optional KL penalty to the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["group_advantages", "grpo_loss", "RolloutLossOutput"]


class RolloutLossOutput(NamedTuple):
    losses: torch.Tensor  # (N,) per-completion share of the micro-batch loss; the loop takes the mean
    metrics: dict         # name -> detached (N,) tensor: kl, clipped (fraction of tokens the clip bound), ratio


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / (std(group) + eps) for rewards (N,) laid out group-major
    (N = groups * group_size); `scale=False` keeps r_i - mean (Dr. GRPO, Liu et al. 2025).

    std is the sample std (divide by G - 1), as TRL's scale_rewards="group". Zero-variance groups
    (every completion scored the same: all right, all wrong) get advantage exactly 0: they add no
    policy-gradient signal, only the KL term acts on them; callers count them. Example: rewards
    [1, 0, 0, 0], G 4: mean 0.25, std 0.5, advantages [1.499700, -0.499900, -0.499900, -0.499900]
    (eps 1e-4).
    """
    g = rewards.float().view(-1, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def grpo_loss(policy_logps: torch.Tensor, old_logps: torch.Tensor, reference_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_epsilon: float, clip_epsilon_high: float,
              kl_coef: float, grpo_token_level: bool, tis_cap: float = 0.0,
              sampler_logps: torch.Tensor | None = None) -> RolloutLossOutput:
    """The GRPO objective, negated (a loss), over token log-probs (N, K) with `mask` (N, K) on
    completion tokens and one advantage per completion (N,):

        ratio_t = exp(logp_t - old_t)
        L_t     = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A) + kl_coef * KL_t
        KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1      (the k3 estimator: >= 0, unbiased)

    `old` are the log-probs of the policy that sampled the completions (detached); with one
    optimisation pass per batch of samples they equal the current ones, so ratio = 1, nothing
    clips and the gradient is A * grad log p (the policy gradient with a group baseline).
    Reduction: `grpo_token_level=False` (the paper's) averages L_t over each completion's tokens, then
    over completions; `grpo_token_level=True` (DAPO, Yu et al. 2025) averages over every completion
    token of the micro-batch, so long completions weigh in proportion to their length. Both are
    returned as per-completion values whose mean is the loss. `clip_epsilon_high` 0 means
    `clip_epsilon` (symmetric). `reference_logps` None (or kl_coef 0): no KL term.

    Worked example (one completion, two tokens, A = 1, old = logp, ref = logp - 0.1, kl_coef 0.1):
    ratio 1, policy term -1 per token; KL_t = e^-0.1 + 0.1 - 1 = 0.0048374; loss -0.9995163.

    Truncated importance sampling (`tis_cap` > 0, with `sampler_logps`: the log-probs the sampling
    engine gave the same tokens): the completions were drawn by the sampler, not by the policy the
    trainer computes `old` for; each token's policy term is weighted by
    w_t = min(exp(old_t - sampler_t), tis_cap) (detached), which corrects the mismatch and bounds
    the variance (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"). The KL term is not weighted. Example: old - sampler = log 3 at a token, cap 2:
    w = 2, so that token's policy term doubles.
    """
    mask = mask.to(policy_logps.dtype)
    high = clip_epsilon_high or clip_epsilon
    ratio = torch.exp(policy_logps - old_logps.detach())
    adv = advantages.to(policy_logps.dtype).unsqueeze(1)
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - clip_epsilon, 1 + high) * adv
    per_token = -torch.min(unclipped, clipped)
    weights = None
    if tis_cap and sampler_logps is not None:
        weights = torch.exp(old_logps.detach() - sampler_logps.detach()).clamp(max=tis_cap)
        per_token = per_token * weights
    if reference_logps is not None and kl_coef:
        delta = reference_logps.detach() - policy_logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_coef * kl
    else:
        kl = torch.zeros_like(per_token)
    counts = mask.sum(dim=1)
    if grpo_token_level:
        losses = (per_token * mask).sum(dim=1) * mask.size(0) / counts.sum().clamp(min=1)
    else:
        losses = (per_token * mask).sum(dim=1) / counts.clamp(min=1)
    was_clipped = ((clipped < unclipped) & (mask > 0)).to(mask.dtype)  # the clip is what the min took
    metrics = {"kl": ((kl * mask).sum(dim=1) / counts.clamp(min=1)).detach(),
               "clipped": (was_clipped.sum(dim=1) / counts.clamp(min=1)).detach(),
               "ratio": ((ratio * mask).sum(dim=1) / counts.clamp(min=1)).detach()}
    if weights is not None:
        metrics["tis/weight"] = ((weights * mask).sum(dim=1) / counts.clamp(min=1)).detach()
    return RolloutLossOutput(losses, metrics)
