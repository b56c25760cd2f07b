"""core/stats.py's paired statistics, seed spread and selection folds, against hand arithmetic
(the sums are in each docstring; scipy is not installed here to serve as an oracle)."""

import math

import pytest

from preftune.core.stats import (
    bootstrap_ci,
    holds_across_seeds,
    kfold,
    mcnemar_exact,
    paired_gain,
    seed_spread,
    spread,
    win_rate,
)


def _table(gained: int, lost: int, right_both: int, wrong_both: int) -> tuple[list[float], list[float]]:
    """Paired 0/1 outcomes (before, after) from McNemar's 2x2 table."""
    before = [0.0] * gained + [1.0] * lost + [1.0] * right_both + [0.0] * wrong_both
    after = [1.0] * gained + [0.0] * lost + [1.0] * right_both + [0.0] * wrong_both
    return before, after


def test_mcnemar_exact_p_values_by_hand():
    """Two-sided exact p = 2 * sum_{j <= min(b, c)} C(b + c, j) / 2^(b + c), at most 1:
    b=2, c=8:  2 * (1 + 10 + 45) / 1024 = 0.109375
    b=1, c=9:  2 * (1 + 10) / 1024      = 0.021484375
    b=0, c=5:  2 * 1 / 32               = 0.0625
    b=5, c=5:  2 * 638 / 1024 > 1      -> 1
    no discordant pair                 -> 1 (nothing to test)"""
    for (b, c), p in (((2, 8), 0.109375), ((1, 9), 0.021484375), ((0, 5), 0.0625), ((5, 5), 1.0), ((0, 0), 1.0)):
        test = mcnemar_exact(*_table(b, c, 7, 3))
        assert (test["gained"], test["lost"], test["ties"]) == (b, c, 0)
        assert test["p"] == p, (b, c)
    # symmetric in the direction; concordant pairs do not matter
    assert mcnemar_exact(*_table(8, 2, 0, 0))["p"] == mcnemar_exact(*_table(2, 8, 100, 50))["p"] == 0.109375
    # a tie on either side is neither right nor wrong: left out and counted
    test = mcnemar_exact([0.5, 0.0, 1.0, 0.0], [1.0, 0.5, 1.0, 1.0])
    assert (test["gained"], test["lost"], test["ties"], test["p"]) == (1, 0, 2, 1.0)
    # large tables stay exact (big integers): b=300, c=100 is far beyond a float 0.5**n's range of care
    assert 0 < mcnemar_exact(*_table(300, 100, 0, 0))["p"] < 1e-20


def test_paired_bootstrap_interval_is_the_exact_bootstrap_quantile_on_a_tiny_table():
    """Four pairs with differences d = after - before = [1, 1, 0, -1]. A bootstrap draw is 4 draws
    from {+1: 1/2, 0: 1/4, -1: 1/4}; its sum S has generating function (2x + 1 + 1/x)^4 / 256
    = x^-4 (2x^2 + x + 1)^4 / 256, whose coefficients are 1, 4, 14, 28, 49, 56, 56, 32, 16 for
    S = -4..4. P(S <= -3) = 5/256 = 0.0195 < 0.025 <= P(S <= -2) = 19/256, so the 2.5% quantile
    of the mean S/4 is -2/4 = -0.5; P(S = 4) = 16/256 = 0.0625 > 0.025, so the 97.5% quantile
    is 4/4 = 1. 20,000 draws put the 2.5% cut ~5.6 standard deviations from the next value."""
    r = paired_gain([0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], n=20000)
    assert r["gain_ci95"] == [-0.5, 1.0]
    assert (r["before"], r["after"], r["gain"], r["gained"], r["lost"]) == (0.5, 0.75, 0.25, 2, 1)
    assert r["mcnemar_p"] == 1.0  # b=2, c=1: 2 * (1 + 3) / 8 > 1


def test_paired_bootstrap_interval_matches_the_normal_approximation_on_200_pairs():
    """200 pairs: 30 gained, 10 lost, 60 right both times, 100 wrong both times. Gain = 20/200 =
    0.1; the per-pair difference has variance 40/200 - 0.1^2 = 0.19, so the mean's standard
    error is sqrt(0.19 / 200) = 0.030822 and the normal interval 0.1 +- 1.96 * 0.030822 =
    [0.0396, 0.1604]. The bootstrap's steps are 1/200 = 0.005 wide. McNemar: continuity-corrected
    chi-square (|30 - 10| - 1)^2 / 40 = 9.025, p ~ 0.0027; the exact p is a little smaller."""
    before, after = _table(30, 10, 60, 100)
    r = paired_gain(before, after)
    assert r["gain"] == pytest.approx(0.1) and (r["before"], r["after"]) == (0.35, 0.45)
    assert r["gain_ci95"] == pytest.approx([0.0396, 0.1604], abs=0.0076)
    assert 0.001 < r["mcnemar_p"] < 0.0027
    # the same accuracies with the pairs shuffled apart (unpaired) are not what this measures:
    # reordering after alone changes the table and the interval
    shuffled = paired_gain(before, after[::-1])
    assert shuffled["gain"] == pytest.approx(0.1) and shuffled["gained"] != 30
    with pytest.raises(ValueError, match="same pairs"):
        paired_gain(before, after[:-1])


def test_spread_by_hand():
    """Gains 0.10, 0.14, 0.06: mean 0.10; squared deviations 0, 0.0016, 0.0016 over n - 1 = 2:
    variance 0.0016, std 0.04."""
    s = spread([0.10, 0.14, 0.06])
    assert s["mean"] == pytest.approx(0.10) and s["std"] == pytest.approx(0.04)
    assert (s["min"], s["max"], s["count"]) == (0.06, 0.14, 3)
    assert spread([0.2])["std"] == 0.0


def test_seed_spread_interval_carries_the_seed_level():
    """Three seeds whose every pair moves the same way within a seed (seed A: +1 on all pairs,
    B and C: 0), so the pair level adds nothing and the draw's mean is the fraction of A among 3
    seeds drawn with replacement: Binomial(3, 1/3)/3. P(0 A) = 8/27 = 0.296 > 0.025, so the lower
    end is 0; P(3 A) = 1/27 = 0.037 > 0.025, so the upper end is 1. Mean 1/3, std of (1, 0, 0) =
    sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)."""
    m = 10
    outcomes = [([0.0] * m, [1.0] * m), ([1.0] * m, [1.0] * m), ([0.0] * m, [0.0] * m)]
    r = seed_spread(outcomes)
    assert r["ci95"] == [0.0, 1.0] and r["seeds"] == 3 and r["pairs"] == m
    assert r["mean"] == pytest.approx(1 / 3) and r["std"] == pytest.approx(math.sqrt(1 / 3))
    assert (r["min"], r["max"]) == (0.0, 1.0) and [g["gain"] for g in r["per_seed"]] == [1.0, 0.0, 0.0]


def test_seed_spread_resamples_the_shared_pairs_once_per_draw():
    """Three identical seeds on the 200-pair table: the seed level adds nothing, so the interval
    of the mean must be the one-seed paired interval, [0.0396, 0.1604] by the normal
    approximation. Resampling pairs separately for each seed would average the shared pair noise
    over 3 seeds and come out sqrt(3) ~ 1.7x too narrow (about +-0.035)."""
    table = _table(30, 10, 60, 100)
    r = seed_spread([table] * 3)
    assert r["mean"] == pytest.approx(0.1) and r["std"] == pytest.approx(0.0, abs=1e-12)
    assert r["ci95"] == pytest.approx([0.0396, 0.1604], abs=0.0076)
    with pytest.raises(ValueError, match="same pairs"):
        seed_spread([table, (table[0][:-1], table[1][:-1])])


def _summary(gains, ci, seeds=None):
    return {"seeds": seeds or len(gains), "per_seed": [{"gain": g} for g in gains],
            "mean": sum(gains) / len(gains), "ci95": ci}


def test_tuned_only_if_the_gain_holds_across_seeds():
    assert holds_across_seeds(_summary([0.10, 0.12, 0.08], [0.05, 0.15]), min_gain=0.08)["tuned"] is True
    one_loses = holds_across_seeds(_summary([0.20, 0.12, -0.01], [0.02, 0.2]))
    assert one_loses["tuned"] is False and one_loses["failed"] == ["every seed gains"]
    assert holds_across_seeds(_summary([0.10, 0.12], [0.05, 0.15]))["failed"] == ["at least 3 seeds"]
    assert holds_across_seeds(_summary([0.02, 0.03, 0.01], [-0.01, 0.06]), min_gain=0.08)["failed"] == \
        ["interval of the mean excludes 0", "mean gain >= 0.08"]
    # end to end from outcomes: three seeds that all gain on the 200-pair table are tuned
    assert holds_across_seeds(seed_spread([_table(30, 10, 60, 100)] * 3))["tuned"] is True


def test_kfold_partitions_by_key_deterministically_and_refuses_dev_keys():
    keys = ["p0", "p1", "p1", "p2", "p3", "p3", "p3", "p4", "p5", "p6"]  # p1, p3: several pairs per prompt
    folds = kfold(keys, 3, seed=0)
    assert folds == kfold(keys, 3, seed=0)  # deterministic by seed
    assert any(f != g for f, g in zip(folds, kfold(keys, 3, seed=1)))
    held = [i for _, val in folds for i in val]
    assert sorted(held) == list(range(len(keys)))  # every item validates exactly once
    for fit, val in folds:
        assert sorted(fit + val) == list(range(len(keys)))
        assert not {keys[i] for i in fit} & {keys[i] for i in val}  # a prompt stays on one side
    assert sorted(len(val) for _, val in folds) == [3, 3, 4]  # 10 items, groups of 3, 2 and 1s
    # pinned so a change of shuffling shows: random.Random(0) is the same on every machine
    # (the 3-pair prompt p3 first, then p1's 2, then the single ones each to the smallest fold)
    assert folds == [([0, 1, 2, 3, 7, 8], [4, 5, 6, 9]), ([3, 4, 5, 6, 7, 8, 9], [0, 1, 2]),
                     ([0, 1, 2, 4, 5, 6, 9], [3, 7, 8])]
    with pytest.raises(ValueError, match="share a key with the dev pairs"):
        kfold(keys, 3, seed=0, exclude={"p3"})
    with pytest.raises(ValueError, match="2 <= k"):
        kfold(keys, 8, seed=0)  # 7 distinct prompts


def test_win_rate_counts_ties_half_skips_failures_and_bootstraps_over_prompts():
    """3 prompts x 2 samples: prompt 0 wins both, prompt 1 ties one and loses one (a NaN pair left
    out), prompt 2 has only a failed score and a loss. By hand: outcomes 1, 1, 0.5, 0, 0 over 5
    comparisons = 0.5; per-prompt means 1.0, 0.25, 0.0 are what the interval resamples."""
    nan = float("nan")
    got = win_rate([3, 2, 1, 0, nan, 1], [1, 1, 1, 2, 0, 5], per_prompt=2)
    assert got["win_rate"] == 0.5 and got["comparisons"] == 5 and got["failed"] == 1 and got["prompts"] == 3
    assert got["ci95"] == list(bootstrap_ci([1.0, 0.25, 0.0])) and got["by_prompt"] == [1.0, 0.25, 0.0]
    # the same outcomes pooled per comparison would give a narrower interval: clustering is what widens it
    flat = bootstrap_ci([1.0, 1.0, 0.5, 0.0, 0.0])
    assert got["ci95"][1] - got["ci95"][0] > flat[1] - flat[0]
    assert math.isnan(win_rate([nan], [1.0], per_prompt=1)["win_rate"])
    with pytest.raises(ValueError, match="whole groups of 2"):
        win_rate([1, 2, 3], [1, 2, 3], per_prompt=2)
    with pytest.raises(ValueError, match="3 policy scores against 2"):
        win_rate([1, 2, 3], [1, 2], per_prompt=1)
