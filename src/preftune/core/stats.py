"""Statistics of evaluation results: bootstrap and Wilson intervals, paired gains (bootstrap over
pairs, McNemar's exact test), seed spread, honest selection folds, calibration, best-of-n.

Pure functions of numbers (no torch), shared by evaluation, the reward model, best-of-N, reports and
the benchmarks.
"""

from __future__ import annotations

import math
import random

__all__ = ["bootstrap_ci", "best_of_n_kl", "best_of_n_curve", "wilson", "reliability", "mcnemar_exact",
           "paired_gain", "win_rate", "rate_by_prompt", "spread", "seed_spread", "crossed_bootstrap",
           "holds_across_seeds", "kfold"]


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


# ---- paired gains: the same pairs before and after ---------------------------------------------

def mcnemar_exact(before: list[float], after: list[float]) -> dict:
    """McNemar's exact test of "before and after are right equally often" on paired 0/1 outcomes.

    Only the discordant pairs carry information: `gained` = wrong before, right after (b);
    `lost` = right before, wrong after (c). Under the null each discordant pair is a fair coin, so
    p = min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c))), two-sided, exact (big integers, no
    normal approximation; McNemar 1947, exact form as in Agresti, Categorical Data Analysis 10.1).
    A pair with a tie (0.5) on either side is neither right nor wrong: it is left out and counted
    in `ties`. No discordant pair: p = 1."""
    gained = lost = ties = 0
    for b, a in zip(before, after, strict=True):
        if b == 0.5 or a == 0.5:
            ties += 1
        elif a > b:
            gained += 1
        elif a < b:
            lost += 1
    n, k = gained + lost, min(gained, lost)
    p = min(1.0, 2 * sum(math.comb(n, j) for j in range(k + 1)) / 2 ** n) if n else 1.0
    return {"gained": gained, "lost": lost, "ties": ties, "p": p}


def paired_gain(before: list[float], after: list[float], *, n: int = 4000, seed: int = 0, level: float = 0.95) -> dict:
    """Accuracy after - accuracy before on the SAME pairs: outcome lists in pair order (1 right,
    0 wrong, 0.5 a tie), with a percentile bootstrap interval that resamples pairs (each draw
    keeps a pair's before and after together: the interval of the mean per-pair difference) and
    McNemar's exact p-value. Pairing removes the between-pair variance that an interval for two
    independent proportions (Newcombe's) carries: when most pairs are right (or wrong) both
    times, as for a model and its own start, the paired interval is much narrower."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired outcomes need the same pairs before and after, got {len(before)} and {len(after)}")
    diffs = [a - b for b, a in zip(before, after)]
    lo, hi = bootstrap_ci(diffs, n=n, seed=seed, level=level)
    test = mcnemar_exact(before, after)
    return {"pairs": len(diffs), "before": math.fsum(before) / len(before), "after": math.fsum(after) / len(after),
            "gain": math.fsum(diffs) / len(diffs), "gain_ci95": [lo, hi], "mcnemar_p": test["p"],
            "gained": test["gained"], "lost": test["lost"], "ties": test["ties"]}


def win_rate(policy: list[float], reference: list[float], per_prompt: int, *, n: int = 4000, seed: int = 0,
             level: float = 0.95) -> dict:
    """The policy's win rate over the reference from scores of their samples, sample k of a prompt
    against the reference's sample k (`per_prompt` of each, prompt by prompt in one order); a tie
    counts half; a pair with a non-finite score is left out and counted (`failed`). The interval:
    `rate_by_prompt`'s."""
    if len(policy) != len(reference):
        raise ValueError(f"win rate: {len(policy)} policy scores against {len(reference)} reference scores")
    outcomes = [math.nan if not (math.isfinite(a) and math.isfinite(b)) else 1.0 if a > b else 0.5 if a == b else 0.0
                for a, b in zip(policy, reference)]
    got = rate_by_prompt(outcomes, per_prompt, n=n, seed=seed, level=level)
    return {"win_rate": got["rate"], **{k: v for k, v in got.items() if k != "rate"}}


def rate_by_prompt(outcomes: list[float], per_prompt: int, *, n: int = 4000, seed: int = 0,
                   level: float = 0.95) -> dict:
    """The mean of per-comparison outcomes in [0, 1] (NaN: failed, left out and counted), grouped
    `per_prompt` to a prompt in order, with a percentile bootstrap interval over PROMPTS of each
    prompt's mean outcome, not over comparisons: a prompt's samples share its difficulty, so
    resampling them one by one would treat correlated outcomes as independent and give too narrow
    an interval (with one sample per prompt the two are the same). A prompt with no finite outcome
    is left out of the interval (its `by_prompt` mean is NaN)."""
    if per_prompt < 1 or len(outcomes) % per_prompt:
        raise ValueError(f"{len(outcomes)} outcomes are not whole groups of {per_prompt} per prompt")
    groups = [[o for o in outcomes[i:i + per_prompt] if math.isfinite(o)] for i in range(0, len(outcomes), per_prompt)]
    means = [math.fsum(g) / len(g) for g in groups if g]
    done = [o for g in groups for o in g]
    lo, hi = bootstrap_ci(means, n=n, seed=seed, level=level) if means else (math.nan, math.nan)
    return {"rate": math.fsum(done) / len(done) if done else math.nan, "ci95": [lo, hi],
            "comparisons": len(done), "prompts": len(means), "failed": len(outcomes) - len(done),
            "by_prompt": [math.fsum(g) / len(g) if g else math.nan for g in groups]}


# ---- seed spread: the same pairs under several training seeds ---------------------------------

def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1; 0 for one value), min and max of per-seed figures."""
    if not values:
        raise ValueError("spread of no values")
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "min": min(values), "max": max(values), "count": len(values)}


def seed_spread(outcomes: list[tuple[list[float], list[float]]], *, n: int = 4000, seed: int = 0,
                level: float = 0.95) -> dict:
    """The gain of a recipe trained with several seeds and evaluated on the SAME pairs.

    `outcomes[s]` = (before, after) outcome lists of seed s in one pair order (`paired_gain`'s
    inputs; before is usually the base model's for every seed). Returns each seed's paired gain,
    their spread (mean, std, min, max) and an interval of the mean gain over seeds AND pairs.

    The interval is a crossed two-way bootstrap (Owen 2007, "The pigeonhole bootstrap", Ann. Appl.
    Stat. 1:386): each draw resamples the seeds (k of k) and, independently, the pairs (m of m),
    and takes the mean over the drawn seeds of their mean over the drawn pairs. The pairs are
    drawn once per draw for all seeds, not once per seed, because every seed is measured on the
    same dev pairs: a hard pair is hard for all of them, and resampling pairs per seed would
    average that shared pair noise away and give too narrow an interval. The seed level uses
    the seeds there are: with 3 seeds it is coarse (10 distinct multisets; a bootstrap of k
    values understates their variance by about (k - 1)/k), which is why the spread is reported
    beside it and `holds_across_seeds` also asks every seed to gain."""
    if not outcomes:
        raise ValueError("seed spread of no seeds")
    m = len(outcomes[0][0])
    if any(len(b) != m or len(a) != m for b, a in outcomes):
        raise ValueError("every seed must be measured on the same pairs (outcome lists of one length)")
    per_seed = [paired_gain(b, a, n=n, seed=seed, level=level) for b, a in outcomes]
    diffs = [[x - y for y, x in zip(b, a)] for b, a in outcomes]  # (k, m): after - before per pair
    return {"seeds": len(diffs), "pairs": m, "per_seed": per_seed, **spread([g["gain"] for g in per_seed]),
            "ci95": crossed_bootstrap(diffs, n=n, seed=seed, level=level),
            "method": "crossed bootstrap: seeds and pairs resampled independently, the pairs shared by every seed"}


def crossed_bootstrap(values: list[list[float]], *, n: int = 4000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile interval of the grand mean of `values[s][i]` (seed s, item i; every seed measured
    on the same items), with seeds and items resampled independently and each draw's items shared
    by every seed (see `seed_spread` for why)."""
    k, m = len(values), len(values[0])
    rng, means = random.Random(seed), []
    for _ in range(n):
        weights = [0] * k
        for s in rng.choices(range(k), k=k):
            weights[s] += 1
        idx = rng.choices(range(m), k=m)
        means.append(math.fsum(w * math.fsum(values[s][i] for i in idx) for s, w in enumerate(weights) if w) / (k * m))
    means.sort()
    return [means[int((1 - level) / 2 * n)], means[int((1 + level) / 2 * n) - 1]]


def holds_across_seeds(summary: dict, *, min_seeds: int = 3, min_gain: float = 0.0) -> dict:
    """Issue 39's rule: a recipe is "tuned" only if its gain holds across seeds. From
    `seed_spread`'s summary: at least `min_seeds` seeds, every seed's gain > 0 (none loses on the
    dev pairs), the seeds-and-pairs interval of the mean gain above 0, and the mean >= `min_gain`
    (e.g. 0.08 for the acceptance bar). `failed` names the checks that did not pass."""
    checks = {f"at least {min_seeds} seeds": summary["seeds"] >= min_seeds,
              "every seed gains": all(g["gain"] > 0 for g in summary["per_seed"]),
              "interval of the mean excludes 0": summary["ci95"][0] > 0,
              f"mean gain >= {min_gain:g}": summary["mean"] >= min_gain}
    return {"tuned": all(checks.values()), "checks": checks, "failed": [name for name, ok in checks.items() if not ok]}


# ---- honest selection: validation folds from the training side ---------------------------------

def kfold(keys: list[str], k: int, *, seed: int, exclude=()) -> list[tuple[list[int], list[int]]]:
    """k (fit, validation) index splits of the TRAINING items, for choosing a recipe without the
    dev pairs that report the result (issue 39 item 4). A single validation split is fold 0
    (k = 5: a fifth held out).

    `keys[i]` groups items that must stay on one side (the prompt: pairs sharing a prompt in
    fit and validation would leak). Groups are shuffled by `seed` (random.Random: the same folds
    on any machine and Python), then taken largest first, each to the fold with the fewest items
    so far, so fold sizes differ by at most the largest group. `exclude` holds the dev pairs' keys: a training
    item sharing one is an error, not a silent drop, because it means the split the benchmark
    reports on is not held out."""
    dev = set(exclude)
    leaked = [key for key in keys if key in dev]
    if leaked:
        raise ValueError(f"{len(leaked)} training item(s) share a key with the dev pairs (e.g. {leaked[0]!r}): "
                         "the dev pairs are not held out")
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    if not 2 <= k <= len(groups):
        raise ValueError(f"k-fold needs 2 <= k <= the number of distinct keys ({len(groups)}), got k={k}")
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    order.sort(key=len, reverse=True)  # largest first (stable: shuffled among equal sizes), so sizes balance
    folds: list[list[int]] = [[] for _ in range(k)]
    for members in order:
        min(folds, key=len).extend(members)  # the first of the smallest: deterministic
    every = range(len(keys))
    return [(sorted(set(every) - set(f)), sorted(f)) for f in folds]
