"""Policy-gradient RL on sampled completions: PPO with a critic (Schulman et al. 2017; the RLHF
form of Ziegler et al. 2019 and Ouyang et al. 2022), RLOO (Ahmadian et al. 2024) and REINFORCE++
(Hu 2025). Pure functions: tensors in, tensors out.

The three share one policy loss (`ppo_loss`: the clipped ratio against the sampling policy) and
differ in how a batch of scored samples becomes per-token advantages, computed once per batch of
samples, before any gradient step (runs/online/ppo.py):

- `gae_advantages` (PPO): a per-token reward (minus kl_coef times the k1 estimate
  log pi_old - log pi_ref at every token, the score added at the last token), the critic's
  values, GAE(gamma, lambda) advantages and the returns the critic regresses on.
- `rloo_advantages` (RLOO): the sequence reward (score minus kl_coef times the summed k1 KL), minus
  the mean reward of the other k - 1 samples of the same prompt; one advantage per completion.
- `reinforce_pp_advantages` (REINFORCE++): the same per-token KL-penalised reward as PPO, its
  return-to-go (gamma 1, no critic), normalised over the whole batch of samples.

Every per-token tensor is (N, K) with a (N, K) `mask` on completion tokens, laid out as
core/logprobs.completion_token_logps returns them: position k of row n is the k-th completion
token's action, taken in the state of the tokens before it.
"""

from __future__ import annotations

import torch

from .grpo import RolloutLossOutput

__all__ = ["masked_mean", "masked_var", "whiten", "shaped_scores", "kl_penalized_rewards", "gae", "gae_advantages",
           "rloo_advantages", "reinforce_pp_advantages", "explained_variance", "ppo_loss", "ESTIMATORS"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The unbiased (n - 1) variance of the masked entries."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    centred = (x - masked_mean(x, mask)) * mask
    return (centred ** 2).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased variance); `shift_mean=False`
    keeps the mean (rewards are scaled, not centred). Entries outside the mask become 0.
    Example: [1, 2, 3] -> mean 2, var 1 -> [-1, 0, 1] (to within eps)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def shaped_scores(scores: torch.Tensor, no_eos: torch.Tensor, *, missing_eos_penalty: float = 0.0,
                  reward_clip: float = 0.0, whiten_rewards: bool = False) -> torch.Tensor:
    """The scores a batch of samples trains on: minus `missing_eos_penalty` for completions that
    did not end with EOS (cut at the token budget), clipped to [-reward_clip, reward_clip]
    (0 = off), then scaled to unit variance over the batch with their mean kept (`whiten_rewards`).
    Example: scores [2, -3], no EOS [1, 0], penalty 1, clip 2.5: [1, -2.5]."""
    out = scores.float() - missing_eos_penalty * no_eos.float()
    if reward_clip:
        out = out.clamp(-reward_clip, reward_clip)
    if whiten_rewards and out.numel() > 1:
        out = (out - out.mean()) / (out.std() + 1e-8) + out.mean()
    return out


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last completion token (0 for an empty row)."""
    cols = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), cols, torch.zeros_like(cols)).max(dim=1).values


def kl_penalized_rewards(scores: torch.Tensor, old_logps: torch.Tensor, reference_logps: torch.Tensor,
                         mask: torch.Tensor, *, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -kl_coef * (old_t - ref_t), plus the sequence's score at its last
    completion token (the EOS, when it ended). Returns (rewards, k1 KL per token), both (N, K),
    zero outside the mask. Example: one row, 2 tokens, old - ref = [0.5, -0.1], score 1,
    kl_coef 0.1: rewards [-0.05, 0.01 + 1] = [-0.05, 1.01]."""
    mask_f = mask.to(old_logps.dtype)
    kl = (old_logps - reference_logps) * mask_f
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards = rewards.index_put((rows, _last_index(mask)), scores.to(rewards.dtype), accumulate=True)
    return rewards * mask_f, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) along each row's completion tokens:
    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0: the episode ended),
    A_t = delta_t + gamma * lam * A_{t+1}; returns R_t = A_t + V_t. Rows are right-aligned to
    their mask, so tokens outside it are skipped. Example: r [0, 1], V [0.5, 0.2], gamma 1,
    lam 0.9: delta [0.2 - 0.5, 1 - 0.2] = [-0.3, 0.8]; A [-0.3 + 0.9 * 0.8, 0.8] = [0.42, 0.8];
    R [0.92, 1.0]."""
    mask_f = mask.to(values.dtype)
    values = values * mask_f
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(values.size(0), dtype=values.dtype, device=values.device)
    running = torch.zeros_like(next_value)
    for t in range(values.size(1) - 1, -1, -1):
        m = mask_f[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(m > 0, delta + gamma * lam * running, running)
        advantages[:, t] = running * m
        next_value = torch.where(m > 0, values[:, t], next_value)
    return advantages, (advantages + values) * mask_f


def gae_advantages(scores, old_logps, reference_logps, mask, *, kl_coef: float, values: torch.Tensor,
                   gamma: float = 1.0, lam: float = 0.95, whiten_advantages: bool = True, **_):
    """PPO: KL-penalised per-token rewards, GAE against the critic's `values`, the advantages
    whitened over the batch (the returns are not). Returns (advantages, returns, kl) (N, K)."""
    rewards, kl = kl_penalized_rewards(scores, old_logps, reference_logps, mask, kl_coef=kl_coef)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    if whiten_advantages:
        advantages = whiten(advantages, mask)
    return advantages, returns, kl


def rloo_advantages(scores, old_logps, reference_logps, mask, *, kl_coef: float, group_size: int, **_):
    """RLOO: R_i = score_i - kl_coef * sum_t k1_t; A_i = R_i - mean_{j != i} R_j over the k
    samples of the same prompt (rows group-major), the same advantage at every token of the
    completion. Example: R = [1, 0, 0, 0] (k 4): baselines [0, 1/3, 1/3, 1/3], A [1, -1/3, -1/3, -1/3].
    Returns (advantages, returns = the sequence rewards at every token, kl) (N, K)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (online.samples_per_prompt)")
    mask_f = mask.to(old_logps.dtype)
    kl = (old_logps - reference_logps) * mask_f
    reward = scores.to(kl.dtype) - kl_coef * kl.sum(dim=1)
    g = reward.view(-1, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    advantages = (g - baseline).reshape(-1)
    return advantages.unsqueeze(1) * mask_f, reward.unsqueeze(1) * mask_f, kl


def reinforce_pp_advantages(scores, old_logps, reference_logps, mask, *, kl_coef: float, group_size: int = 1,
                            baseline: bool = False, **_):
    """REINFORCE++: the per-token rewards of `kl_penalized_rewards`, their return-to-go
    G_t = sum_{s >= t} r_s (gamma 1), normalised over every completion token of the batch (the
    global-batch normalisation that replaces the critic). `baseline=True` (REINFORCE++-baseline)
    first subtracts the mean score of the prompt's group. Returns (advantages, returns, kl)."""
    if baseline:
        g = scores.to(old_logps.dtype).view(-1, group_size)
        scores = (g - g.mean(dim=1, keepdim=True)).reshape(-1)
    rewards, kl = kl_penalized_rewards(scores, old_logps, reference_logps, mask, kl_coef=kl_coef)
    returns = rewards.flip(1).cumsum(1).flip(1) * mask.to(rewards.dtype)
    return whiten(returns, mask), returns, kl


ESTIMATORS = {"gae": gae_advantages, "rloo": rloo_advantages, "reinforce_pp": reinforce_pp_advantages}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens: 1 is a perfect critic, 0
    one no better than a constant, below 0 worse. NaN when the returns do not vary."""
    var = masked_var(returns, mask)
    if float(var) == 0.0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var)


def ppo_loss(policy_logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
             clip_epsilon: float, clip_epsilon_high: float = 0.0, values: torch.Tensor | None = None,
             old_values: torch.Tensor | None = None, returns: torch.Tensor | None = None, vf_coef: float = 0.1,
             vf_clip: float = 0.2, tis_cap: float = 0.0, sampler_logps: torch.Tensor | None = None) -> RolloutLossOutput:
    """The clipped policy loss on per-token advantages (N, K), plus, with a critic, the clipped
    value loss (PPO2's), both averaged over every completion token of the micro-batch:

        ratio_t = exp(logp_t - old_t)
        pg_t    = -min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps_high) * A_t)
        vf_t    = 0.5 * max((V_t - R_t)^2, (old_V_t + clip(V_t - old_V_t, -vf_clip, vf_clip) - R_t)^2)
        loss    = mean_t pg_t + vf_coef * mean_t vf_t

    No KL term: RLHF's KL penalty is in the reward (`kl_penalized_rewards`). Returned as
    per-completion values whose mean is the loss (token-level, like grpo_loss's token level).
    `tis_cap`: truncated importance sampling, as grpo_loss. Worked example (one completion, one
    token, A 1, logp = old + log 1.5, eps 0.2): ratio 1.5, clipped 1.2, pg = -min(1.5, 1.2) = -1.2;
    with V 0.5, old_V 0, R 1, vf_clip 0.2: vf = 0.5 * max(0.25, 0.64) = 0.32; vf_coef 0.1 -> -1.168.
    """
    mask_f = mask.to(policy_logps.dtype)
    high = clip_epsilon_high or clip_epsilon
    log_ratio = policy_logps - old_logps.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(policy_logps.dtype)
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - clip_epsilon, 1 + high) * adv
    pg = -torch.min(unclipped, clipped)
    weights = None
    if tis_cap and sampler_logps is not None:
        weights = torch.exp(old_logps.detach() - sampler_logps.detach()).clamp(max=tis_cap)
        pg = pg * weights
    n_rows, total = mask_f.size(0), mask_f.sum().clamp(min=1)
    per_row = lambda x: (x * mask_f).sum(dim=1) * n_rows / total  # noqa: E731  rows whose mean is the token mean
    losses = per_row(pg)
    counts = mask_f.sum(dim=1).clamp(min=1)
    row_mean = lambda x: ((x * mask_f).sum(dim=1) / counts).detach()  # noqa: E731
    metrics = {"policy/loss": per_row(pg).detach(),
               "policy/clipfrac": row_mean(((clipped < unclipped) & mask.bool()).to(mask_f.dtype)),
               "policy/approx_kl": row_mean(0.5 * log_ratio.detach() ** 2),
               "ratio": row_mean(ratio.detach()),
               "entropy": row_mean(-policy_logps.detach())}  # -log p of the sampled tokens: an estimate of the entropy
    if weights is not None:
        metrics["tis/weight"] = row_mean(weights)
    if values is not None:
        old_v, ret = old_values.detach().to(values.dtype), returns.detach().to(values.dtype)
        v_clipped = old_v + torch.clamp(values - old_v, -vf_clip, vf_clip)
        loss_unclipped, loss_clipped = (values - ret) ** 2, (v_clipped - ret) ** 2
        vf = 0.5 * torch.max(loss_unclipped, loss_clipped)
        losses = losses + vf_coef * per_row(vf)
        metrics["value/loss"] = per_row(vf).detach()
        metrics["value/clipfrac"] = row_mean((loss_clipped > loss_unclipped).to(mask_f.dtype))
        metrics["value/mean"] = row_mean(values.detach())
    return RolloutLossOutput(losses, metrics)
