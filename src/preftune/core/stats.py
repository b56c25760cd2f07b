"""Statistics of evaluation results: bootstrap and Wilson intervals, calibration, best-of-n.

Pure functions of numbers (no torch), shared by evaluation, the reward model, best-of-N and reports.
"""

from __future__ import annotations

import math
import random

__all__ = ["bootstrap_ci", "best_of_n_kl", "best_of_n_curve", "wilson", "reliability"]


def bootstrap_ci(values: list[float], *, n: int = 4000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n))
    return means[int((1 - level) / 2 * n)], means[int((1 + level) / 2 * n) - 1]


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) as the literature states it: log n - (n - 1) / n nats (used by Stiennon
    et al. 2020 and Gao et al. 2022, "Scaling laws for reward model overoptimization"). It is
    analytic, not measured; Beirami et al. 2024 ("Theoretical guarantees on the best-of-n
    alignment policy") show it is an upper bound on the true KL."""
    return math.log(n) - (n - 1) / n


def best_of_n_curve(scores: list[list[float]], ns: list[int], *, seed: int = 0) -> dict:
    """Mean reward of best-of-n for each n in `ns`, from ONE set of samples per prompt.

    `scores[k]` holds prompt k's sample scores in sampling order; best-of-n is the max over the
    first n of them (nested subsets: every n reuses the same draws, so per prompt the curve can
    only rise, and a larger n costs no extra samples). NaN scores (failed) are skipped and counted;
    a prompt with no finite score among its first n is left out of that n (`prompts` says how
    many count). Each n gets a 95% percentile bootstrap interval over prompts, the paired gain
    over the smallest n with its own interval, and the analytic KL bound `best_of_n_kl`."""
    ns = sorted(set(ns))
    if not ns or ns[0] < 1 or any(len(group) < ns[-1] for group in scores):
        raise ValueError(f"best-of-n needs 1 <= n <= the samples per prompt, got {ns}")
    curve, base = [], None
    for n in ns:
        best = [max(f) if f else math.nan for f in ([s for s in group[:n] if math.isfinite(s)] for group in scores)]
        if base is None:
            base = best
        usable = [b for b in best if math.isfinite(b)]
        gains = [b - a for a, b in zip(base, best) if math.isfinite(a) and math.isfinite(b)]
        curve.append({"n": n, "reward": sum(usable) / len(usable) if usable else math.nan,
                      "reward_ci95": list(bootstrap_ci(usable, seed=seed)) if usable else [math.nan, math.nan],
                      f"gain_vs_{ns[0]}": sum(gains) / len(gains) if gains else math.nan,
                      f"gain_vs_{ns[0]}_ci95": list(bootstrap_ci(gains, seed=seed)) if gains else [math.nan, math.nan],
                      "prompts": len(usable), "kl_bound": best_of_n_kl(n)})
    flat = [s for group in scores for s in group[: ns[-1]]]
    return {"curve": curve, "samples_per_prompt": ns[-1], "prompts": len(scores),
            "failed": sum(not math.isfinite(s) for s in flat),
            "kl": "analytic bound log(n) - (n-1)/n (Stiennon et al. 2020; an upper bound, Beirami et al. 2024)"}


def wilson(successes: float, n: int, z: float = 1.96) -> list[float]:
    """Wilson score 95% interval of a proportion (ties counted as half a success)."""
    if n == 0:
        return [math.nan, math.nan]
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]


def reliability(margins: list[float], bins: int = 10) -> dict:
    """How well sigmoid(margin) predicts that chosen beats rejected (Bradley-Terry: a reward
    model's margin r_c - r_r; DPO: the implicit-reward margin). Pairs are binned by the predicted
    probability of the side the model prefers (in [0.5, 1]); each bin holds its mean prediction,
    the fraction of those pairs where the model's preferred side is the labelled chosen one, and
    its count. ECE = count-weighted mean |prediction - accuracy|. Ties (margin 0) sit at 0.5."""
    edges = [0.5 + 0.5 * k / bins for k in range(bins + 1)]
    sums = [[0.0, 0.0, 0] for _ in range(bins)]
    for m in margins:
        p = 1 / (1 + math.exp(-abs(m))) if abs(m) < 700 else 1.0
        k = min(int((p - 0.5) * 2 * bins), bins - 1)
        sums[k][0] += p
        sums[k][1] += 1.0 if m > 0 else 0.5 if m == 0 else 0.0
        sums[k][2] += 1
    n = max(len(margins), 1)
    table = [{"lo": edges[k], "hi": edges[k + 1], "confidence": s[0] / s[2], "accuracy": s[1] / s[2], "pairs": s[2]}
             for k, s in enumerate(sums) if s[2]]
    return {"bins": table, "ece": math.fsum(b["pairs"] * abs(b["confidence"] - b["accuracy"]) for b in table) / n}
