"""GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300) on per-token log-probs of sampled
completions. Pure functions: tensors in, tensors out.

A group is the G completions sampled for one prompt; `group_advantages` turns their rewards into
advantages, `grpo_loss` is the clipped policy-ratio objective over completion tokens with an
optional KL penalty to the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["group_advantages", "grpo_loss", "rollout_output", "RolloutLossOutput", "REDUCTIONS",
           "soft_overlong_penalty"]


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


def soft_overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, *, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476), the amount subtracted
    from each completion's reward for its length |y| in tokens (EOS included):

        0                                          if |y| <= L_max - L_cache
        penalty * (|y| - (L_max - L_cache)) / L_cache   inside the last L_cache tokens

    with L_max = `max_new_tokens` (no completion is longer) and L_cache = `buffer` (0: none). The
    paper's penalty is 1 (a wrong answer's reward is 0 or -1, the same scale). Example: L_max 32,
    L_cache 8, penalty 1: lengths 24, 28, 32 lose 0, 0.5 and 1.
    """
    if not buffer:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    start = max(max_new_tokens - buffer, 0)
    return penalty * (lengths.float() - start).clamp(min=0) / buffer


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
    high = clip_epsilon_high or clip_epsilon
    ratio = torch.exp(policy_logps - old_logps.detach())
    adv = advantages.to(policy_logps.dtype).unsqueeze(1)
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - clip_epsilon, 1 + high) * adv
    was_clipped = clipped < unclipped  # the clip is what the min took
    return rollout_output(-torch.min(unclipped, clipped), policy_logps, old_logps, reference_logps, mask,
                          kl_coef=kl_coef, reduction="token" if grpo_token_level else "sequence", ratio=ratio,
                          was_clipped=was_clipped, tis_cap=tis_cap, sampler_logps=sampler_logps)


REDUCTIONS = ("sequence", "token", "constant", "sum")


def rollout_output(per_token: torch.Tensor, policy_logps: torch.Tensor, old_logps: torch.Tensor,
                   reference_logps: torch.Tensor | None, mask: torch.Tensor, *, kl_coef: float, reduction: str,
                   ratio: torch.Tensor, was_clipped: torch.Tensor, tis_cap: float = 0.0,
                   sampler_logps: torch.Tensor | None = None, constant: float = 0.0) -> RolloutLossOutput:
    """What every loss of the GRPO family shares after its policy term `per_token` ((N, K), or
    (N, 1) for a sequence-level term, broadcast to the completion's tokens): the truncated-IS
    weight on the policy term, the k3 KL term, the reduction and the metrics. Reductions, each
    returned per completion so that the loop's mean over completions is the loss:

    - `sequence`: each completion's token mean, then the mean over completions (GRPO's);
    - `token`: the mean over every completion token of the micro-batch (DAPO's, TRL's bnpo);
    - `constant`: the token sum over the micro-batch / (N * `constant`) (Dr. GRPO's, the
      constant being the generation budget; 0 = the mask's width K);
    - `sum`: each completion's token sum, then the mean over completions (LUSPO's).

    `ratio` and `was_clipped` ((N, K) or (N, 1)) give the `ratio` and `clipped` metrics: per
    completion means over its tokens.
    """
    mask = mask.to(policy_logps.dtype)
    per_token = per_token.expand_as(mask) if per_token.size(1) == 1 else per_token
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
    sums = (per_token * mask).sum(dim=1)
    if reduction == "token":
        losses = sums * mask.size(0) / counts.sum().clamp(min=1)
    elif reduction == "constant":
        losses = sums / (constant or mask.size(1))
    elif reduction == "sum":
        losses = sums
    elif reduction == "sequence":
        losses = sums / counts.clamp(min=1)
    else:
        raise ValueError(f"unknown reduction {reduction!r}; known: {', '.join(REDUCTIONS)}")

    def token_mean(x):
        return ((x.to(mask.dtype).expand_as(mask) * mask).sum(dim=1) / counts.clamp(min=1)).detach()

    metrics = {"kl": token_mean(kl), "clipped": token_mean(was_clipped), "ratio": token_mean(ratio.detach())}
    if weights is not None:
        metrics["tis/weight"] = token_mean(weights)
    return RolloutLossOutput(losses, metrics)
