"""More losses on DPO's log-ratios: EXO, NCA, SPPO (hard), AOT, APO, DiscoPOP, f-DPO, DPO-Positive,
LD-DPO, WPO and BCO (paired).

Same inputs as dpo.py: four (B,) tensors of summed completion log-probs and keyword settings;
LD-DPO, WPO and BCO also take what their forward computes for them alone (named tensors:
tails, weights, the running baseline; core/losses/__init__.INPUTS and state.py).
Below c = pi_c - ref_c and r = pi_r - ref_r are the chosen and rejected log-ratios and
Delta = c - r. The logged rewards are always beta * c and beta * r, detached, whatever the loss
does with them, so the standard metrics mean the same thing for every loss.

Worked examples use the inputs of dpo.py's: policy -10 / -15, reference -11 / -14, beta 0.1,
so c = 1, r = -1, Delta = 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .types import LossOutput

__all__ = ["exo_pair_loss", "nca_pair_loss", "sppo_hard_loss", "aot_loss", "aot_unpaired_loss", "apo_zero_loss",
           "apo_down_loss", "discopop_loss", "f_dpo_loss", "dpop_loss", "ld_dpo_loss", "wpo_loss", "bco_pair_loss",
           "F_DIVERGENCES"]

# exp() of a score is clamped to e^80 (~5.5e34): finite in float32, where the loop's log-probs
# are; beyond it the score saturates (zero gradient) instead of overflowing to inf and NaN
_EXP_MAX = 80.0


def _logratios(pc, pr, rc, rr):
    return pc - rc, pr - rr  # (B,), (B,)


def _output(losses, c, r, beta, metrics=None) -> LossOutput:
    return LossOutput(losses, beta * c.detach(), beta * r.detach(), metrics or {})


def _smoothed_logistic(z, eps):
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): cDPO's form, eps = 0 is plain logistic."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def exo_pair_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  *, beta: float, exo_epsilon: float) -> LossOutput:
    """EXO, Ji et al. 2024 (arXiv 2402.00856), Eq. 16 with K = 2 completions: the reverse KL from
    the policy's preference over the pair to the labels' one.

    q = (sigmoid(beta Delta), sigmoid(-beta Delta)) is the policy's probability that each side is
    preferred; the labels say (1 - eps, eps). L = KL(q || p) = sum_i q_i (log q_i - log p_i).
    Reverse KL is mode-seeking where DPO's logistic loss (the forward KL) is mean-seeking. eps
    must be > 0 (log eps); its minimum, 0, is at beta Delta = log((1 - eps) / eps).
    Example, eps 1e-3: q = (0.549834, 0.450166);
    0.549834 (log 0.549834 - log 0.999) + 0.450166 (log 0.450166 - log 0.001) = 2.422015.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    z = beta * (c - r)
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)  # log q, stable for |z| large
    losses = log_qw.exp() * (log_qw - math.log1p(-exo_epsilon)) + log_ql.exp() * (log_ql - math.log(exo_epsilon))
    return _output(losses, c, r, beta)


def nca_pair_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  *, beta: float) -> LossOutput:
    """NCA, Chen et al. 2024 (arXiv 2402.05369), its loss for K = 2 with a hard preference (all the
    softmax weight on the chosen side): -log sigmoid(beta c) - 1/2 [log sigmoid(-beta c) + log sigmoid(-beta r)].

    Each reward is scored on its own (absolute), not only their difference: the rejected side is
    always pushed down, and the chosen one towards beta c = log 2 whatever r is (the chosen terms'
    derivative -(1 - sigmoid(beta c)) + sigmoid(beta c) / 2 is zero there), so the chosen
    likelihood does not fall with the rejected one.
    Example: -log sigmoid(0.1) - 0.5 log sigmoid(-0.1) - 0.5 log sigmoid(0.1)
    = 0.644397 + 0.372198 + 0.322198 = 1.338793.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    return _output(losses, c, r, beta)


def sppo_hard_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                   *, beta: float) -> LossOutput:
    """SPPO, Wu et al. 2024 (arXiv 2405.00675), Eq. 4.7 with hard win probabilities (1 for the
    chosen, 0 for the rejected) and eta = 1/beta:  (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2.

    The reference is the previous self-play round's policy; each log-ratio is regressed onto
    its own target, +-eta/2. Example: (1 - 5)^2 + (-1 + 5)^2 = 32; 0 at c = 5, r = -5.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    target = 1 / (2 * beta)
    return _output((c - target) ** 2 + (r + target) ** 2, c, r, beta)


def aot_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             *, beta: float, label_smoothing: float) -> LossOutput:
    """AOT for paired data, Melnyk et al. 2024 (arXiv 2406.05882): the policy's margins
    pi_c - pi_r should dominate the reference's ref_c - ref_r in distribution (first-order
    stochastic dominance), enforced quantile by quantile over the micro-batch:

        delta_(k) = sort(pi_c - pi_r)_k - sort(ref_c - ref_r)_k
        L_k = -(1 - eps) log sigmoid(beta delta_(k)) - eps log sigmoid(-beta delta_(k))

    The k-th loss belongs to the k-th quantile, not to pair k, and the loss depends on which
    pairs share a micro-batch: it is not invariant to splitting a batch into accumulation steps
    (each micro-batch, on each process, is sorted on its own). With one pair, or when both
    orders agree, it is cDPO with eps = label_smoothing.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    # (B,) ascending; gradients flow through sort's values back to the pairs they came from
    policy_margins, _ = torch.sort(policy_chosen_logps - policy_rejected_logps)
    reference_margins, _ = torch.sort(reference_chosen_logps - reference_rejected_logps)
    return _output(_smoothed_logistic(beta * (policy_margins - reference_margins), label_smoothing), c, r, beta)


def aot_unpaired_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                      *, beta: float, label_smoothing: float) -> LossOutput:
    """AOT for unpaired data, Melnyk et al. 2024 (arXiv 2406.05882): the chosen log-ratios c should
    dominate the rejected ones r in distribution, so the two are sorted separately and compared
    quantile by quantile: delta_(k) = sort(c)_k - sort(r)_k, then the same smoothed logistic as
    `aot`. Use it when chosen and rejected completions were not written for the same prompt
    pairwise. The same micro-batch caveat as `aot` applies; with one pair it is cDPO.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen_sorted, _ = torch.sort(c)
    rejected_sorted, _ = torch.sort(r)
    return _output(_smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing), c, r, beta)


def apo_zero_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  *, beta: float) -> LossOutput:
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 7 (plus the constant 1, so the
    loss is >= 0): (1 - sigmoid(beta c)) + sigmoid(beta r).

    Anchored: it always raises the chosen likelihood and lowers the rejected one. For data whose
    chosen answers are better than what the model writes. Example: 1 - sigmoid(0.1) + sigmoid(-0.1)
    = 2 * 0.475021 = 0.950042.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return _output(1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r), c, r, beta)


def apo_down_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  *, beta: float) -> LossOutput:
    """APO-down, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 8 (plus the constant 1):
    sigmoid(beta c) + (1 - sigmoid(beta Delta)).

    It lowers the chosen likelihood and the rejected one more. For data whose chosen answers are
    still worse than what the model writes. Example: sigmoid(0.1) + 1 - sigmoid(0.2)
    = 0.524979 + 0.450166 = 0.975145.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return _output(torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r)), c, r, beta)


def discopop_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  *, beta: float, discopop_tau: float) -> LossOutput:
    """DiscoPOP (the log-ratio modulated loss), Lu et al. 2024 (arXiv 2406.08414), Eq. 5, with
    rho = beta Delta and the blend m = sigmoid(rho / tau):

        L = (1 - m) * (-log sigmoid(rho)) + m * exp(-rho)

    logistic (DPO) where the policy prefers the rejected side, exponential where it prefers the
    chosen one. m * exp(-rho) is computed as exp(log sigmoid(rho/tau) - rho), finite for every rho
    when tau <= 1 (the plain product is 0 * inf = NaN at rho ~ -100).
    Example, tau 0.05: m = sigmoid(4) = 0.982014;
    0.017986 * 0.598139 + 0.982014 * exp(-0.2) = 0.010758 + 0.804005 = 0.814763.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    rho = beta * (c - r)
    logistic = torch.sigmoid(-rho / discopop_tau) * -F.logsigmoid(rho)  # (1 - m) (-log sigmoid(rho))
    exponential = torch.exp(F.logsigmoid(rho / discopop_tau) - rho)    # m exp(-rho)
    return _output(logistic + exponential, c, r, beta)


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def _f_score(logratios, f_divergence_type: str, alpha: float):
    """f'(u) at u = pi / ref = e^logratio, less any constant (constants cancel in the difference);
    Wang et al. 2023, Table 1."""
    if f_divergence_type == "reverse_kl":        # f(u) = u log u:        f'(u) = log u + 1
        return logratios
    if f_divergence_type == "forward_kl":        # f(u) = -log u:         f'(u) = -1/u
        return -torch.exp((-logratios).clamp(max=_EXP_MAX))
    if f_divergence_type == "js_divergence":     # Jensen-Shannon:        f'(u) = log(2u / (1 + u))
        return F.logsigmoid(logratios)           #   = log 2 + log sigmoid(log u)
    if f_divergence_type == "alpha_divergence":  # alpha in (0, 1]:       f'(u) = (1 - u^-alpha) / alpha
        # expm1 keeps the alpha -> 0 limit (reverse KL, f'(u) -> log u) accurate instead of 1 - 1
        return -torch.expm1((-alpha * logratios).clamp(max=_EXP_MAX)) / alpha
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; known: {', '.join(F_DIVERGENCES)}")


def f_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
               *, beta: float, f_divergence_type: str, f_alpha_divergence_coef: float) -> LossOutput:
    """f-DPO, Wang et al. 2023, "Beyond Reverse KL" (arXiv 2309.16240): DPO with the
    policy's divergence from the reference measured by an f-divergence instead of the reverse KL:

        -log sigmoid(beta (f'(u_c) - f'(u_l))),  u = pi / ref per completion

    reverse_kl: f'(u) - 1 = log u, i.e. `sigmoid` exactly. forward_kl: -1/u. js_divergence:
    log sigmoid(log u) (plus log 2). alpha_divergence: (1 - u^-alpha)/alpha with alpha =
    f_alpha_divergence_coef in (0, 1], the paper's alpha: -> reverse KL as alpha -> 0, forward KL
    (plus 1) at alpha = 1. TRL's documentation uses this u^-alpha too; TRL 1.16's code computes
    u^(alpha - 1) instead, its alpha being 1 - ours (the same at the default 0.5).
    Examples (c = 1, r = -1, beta 0.1): forward_kl: -e^-1 + e^1 = 2.350402 -> 0.582517;
    js_divergence: log sigmoid(1) - log sigmoid(-1) = 1 exactly -> -log sigmoid(0.1) = 0.644397;
    alpha 0.5: (1 - e^-0.5)/0.5 - (1 - e^0.5)/0.5 = 2.084381 -> 0.594349.
    exp() is clamped at e^80 (see _EXP_MAX). Rewards are beta * (pi - ref), untransformed.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    score_c = _f_score(c, f_divergence_type, f_alpha_divergence_coef)
    score_r = _f_score(r, f_divergence_type, f_alpha_divergence_coef)
    return _output(-F.logsigmoid(beta * (score_c - score_r)), c, r, beta)


def dpop_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
              *, beta: float, dpop_lambda: float) -> LossOutput:
    """DPO-Positive, Pal et al. 2024, "Smaug" (arXiv 2402.13228), its DPOP loss:

        -log sigmoid(beta (Delta - lambda * max(0, ref_c - pi_c)))

    The penalty is active only while the chosen completion's log-prob is below the reference's:
    DPO can raise the margin by lowering both sides, which on pairs that differ in a few tokens
    (math, multiple choice) lowers the chosen answer's likelihood. lambda = 0, or pi_c >= ref_c,
    is DPO. Example (pi_c = -12, so c = -1, r = -1, Delta = 0, penalty 1), lambda 50:
    -log sigmoid(0.1 * (0 - 50)) = 5.006715; lambda 0: log 2. `dpop/penalty` is logged.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    penalty = torch.relu(reference_chosen_logps - policy_chosen_logps)  # max(0, log ref(y_w) / pi(y_w))
    losses = -F.logsigmoid(beta * (c - r - dpop_lambda * penalty))
    return _output(losses, c, r, beta, {"dpop/penalty": penalty.detach()})


def ld_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                *, beta: float, ld_alpha: float, policy_chosen_tail_logps, policy_rejected_tail_logps,
                reference_chosen_tail_logps, reference_rejected_tail_logps) -> LossOutput:
    """LD-DPO, Liu et al. 2024, "Length Desensitization in Direct Preference Optimization" (arXiv
    2409.06411): DPO on length-desensitised log-probs. With l_p = min(|y_w|, |y_l|), the length
    the pair's two completions share, a completion's tokens past l_p (the longer one's "verbose"
    tail) count alpha times, for the policy and the reference alike:

        log pi^(y) = sum_{t <= l_p} log pi(y_t) + alpha sum_{t > l_p} log pi(y_t) = log pi(y) - (1 - alpha) tail(y)
        L = -log sigmoid(beta ((pi^_c - ref^_c) - (pi^_r - ref^_r)))

    `*_tail_logps` are the tails (0 for the shorter completion and for equal lengths), which the
    forward takes from per-token log-probs (logprobs.pair_logps). alpha = 1 is DPO; alpha = 0
    compares the first l_p tokens of each side only. Rewards are beta (pi^ - ref^), what the loss
    compares (as TRL logs them).
    Example (the rejected side longer: policy tail -4, reference tail -3.5), alpha 0.5:
    pi^_r = -15 + 2 = -13, ref^_r = -14 + 1.75 = -12.25, so c = 1, r = -0.75, Delta = 1.75;
    -log sigmoid(0.175) = 0.609470.
    """
    keep = 1.0 - ld_alpha
    pc, pr = policy_chosen_logps - keep * policy_chosen_tail_logps, policy_rejected_logps - keep * policy_rejected_tail_logps
    rc = reference_chosen_logps - keep * reference_chosen_tail_logps
    rr = reference_rejected_logps - keep * reference_rejected_tail_logps
    c, r = _logratios(pc, pr, rc, rr)
    return _output(-F.logsigmoid(beta * (c - r)), c, r, beta)


def wpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             *, beta: float, chosen_weights, rejected_weights) -> LossOutput:
    """WPO, Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization" (arXiv
    2406.11827): DPO with each pair weighted by how likely the current policy is to write its two
    completions, so off-policy pairs count less, with the paper's sampled weight alignment:

        w(x, y) = exp( (1/|y|) sum_t [log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2] )   (detached)
        L = -w(x, y_w) w(x, y_l) log sigmoid(beta Delta)

    The sum over the vocabulary v makes a completion the policy would sample itself weigh 1 on
    average. `chosen_weights`, `rejected_weights` are w, from the forward (logprobs.pair_logps);
    they carry no gradient. Weights 1 give DPO. TRL's `use_weighting` on its sigmoid loss.
    Example: w = 0.5 and 0.2: 0.1 * 0.598139 = 0.059814. `wpo/weight` (w_w w_l) is logged.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    weight = (chosen_weights * rejected_weights).detach()
    return _output(-weight * F.logsigmoid(beta * (c - r)), c, r, beta, {"wpo/weight": weight})


def bco_pair_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  *, beta: float, reward_baseline) -> LossOutput:
    """BCO on pairs, Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment" (arXiv 2404.04656): each completion classified on its own, the chosen one as
    desirable and the rejected one as not, by its implicit reward shifted by delta:

        L = -log sigmoid(beta c - delta) - log sigmoid(-(beta r - delta))

    delta (`reward_baseline`, a 0-dim tensor) is the paper's reward shift, kept as the running mean
    of the implicit rewards over training (state.RunningRewardMean: loop state, saved in
    checkpoints); it moves the decision boundary to where the rewards are, which tightens the
    classifier loss as a bound on DPO's. TRL's bco_pair (TRL 1.16 keeps delta = 0).
    Example, delta 0: 2 * -log sigmoid(0.1) = 1.288793; delta 0.05: -log sigmoid(0.05)
    - log sigmoid(0.15) = 0.668460 + 0.620957 = 1.289417. `bco/baseline` is logged.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    delta = reward_baseline.detach()
    losses = -F.logsigmoid(beta * c - delta) - F.logsigmoid(-(beta * r - delta))
    return _output(losses, c, r, beta, {"bco/baseline": delta.expand_as(c)})
