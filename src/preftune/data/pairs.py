"""Scored samples -> preference pairs. Pure functions; every dropped candidate is counted.

best_worst: per prompt, the highest- vs the lowest-scored sample.
all_pairs:  per prompt, every two samples with different scores (higher = chosen).
Ties (equal scores, or identical texts) are dropped and counted; so are samples whose score is
NaN (a judge that failed) and pairs whose score difference is below `min_margin`.

From pairwise verdicts instead of scores (`pairs_from_verdicts`, `online.judge_mode=pairwise`):
every two candidates of a prompt are compared in both slot orders. A verdict counts only when
both orders name the same response; both orders "tie" is a tie; any other combination (the
same slot wins twice, or a winner in one order and a tie in the other) depends on position:
it is counted in `position_inconsistent` and dropped, never kept as a pair or a tie.
"""

from __future__ import annotations

import itertools
import math

__all__ = ["build_pairs", "PAIRINGS", "JUDGE_MODES", "VERDICTS", "both_orders", "pairs_from_verdicts"]

PAIRINGS = ("best_worst", "all_pairs")
JUDGE_MODES = ("score", "pairwise")  # online.judge_mode: one rating per sample, or pairwise verdicts
VERDICTS = ("first", "second", "tie", "position_inconsistent", "failed")


def _candidates(n: int, scores: list[float], mode: str):
    if mode == "best_worst":
        hi = max(range(n), key=scores.__getitem__)
        lo = min(range(n), key=scores.__getitem__)
        return [(hi, lo)]
    if mode == "all_pairs":
        return [(i, j) if scores[i] >= scores[j] else (j, i) for i, j in itertools.combinations(range(n), 2)]
    raise ValueError(f"unknown pairing {mode!r}; known: {', '.join(PAIRINGS)}")


def build_pairs(prompt, completions: list[str], scores: list[float], *, mode: str = "best_worst",
                min_margin: float = 0.0, rationales: list | None = None) -> tuple[list[dict], dict]:
    """Pairs for one prompt and the counts of what was dropped (`ties`, `failed`, `below_margin`)."""
    counts = {"pairs": 0, "ties": 0, "failed": 0, "below_margin": 0}
    keep = [i for i, s in enumerate(scores) if isinstance(s, (int, float)) and math.isfinite(s)]
    counts["failed"] = len(scores) - len(keep)
    if len(keep) < 2:
        return [], counts
    sub_scores = [scores[i] for i in keep]
    pairs = []
    for a, b in _candidates(len(keep), sub_scores, mode):
        i, j = keep[a], keep[b]
        margin = scores[i] - scores[j]
        if margin == 0 or completions[i] == completions[j]:
            counts["ties"] += 1
        elif margin < min_margin:
            counts["below_margin"] += 1
        else:
            row = {"prompt": prompt, "chosen": completions[i], "rejected": completions[j],
                   "score_chosen": scores[i], "score_rejected": scores[j]}
            if rationales is not None:
                row["rationale_chosen"], row["rationale_rejected"] = rationales[i], rationales[j]
            pairs.append(row)
    counts["pairs"] = len(pairs)
    return pairs, counts


def both_orders(first: str | None, second: str | None) -> str:
    """One verdict from a judge asked "first vs second" (slots A, B) and then "second vs first".

    `first`, `second`: the winners it named ("A", "B", "tie"), None where it failed. "first" wins
    only as (A, B), "second" only as (B, A), "tie" only as (tie, tie); anything else moved with
    the slot order: "position_inconsistent"."""
    if first is None or second is None:
        return "failed"
    return {("A", "B"): "first", ("B", "A"): "second", ("tie", "tie"): "tie"}.get((first, second),
                                                                                    "position_inconsistent")


def pairs_from_verdicts(prompt, completions: list[str], verdicts: dict, *, mode: str = "best_worst",
                        rationales: dict | None = None) -> tuple[list[dict], dict]:
    """Pairs for one prompt from pairwise verdicts `{(i, j): verdict}` (i < j, `both_orders`).

    all_pairs:  every comparison with a winner. best_worst: one pair, the decided comparison
    whose winner and loser are furthest apart in Copeland score (decided wins minus losses;
    the first in (i, j) order on a tie), so it is a pair the judge itself decided.
    Counts are per comparison: pairs, ties, position_inconsistent, failed (below_margin is 0:
    verdicts have no margin)."""
    if mode not in PAIRINGS:
        raise ValueError(f"unknown pairing {mode!r}; known: {', '.join(PAIRINGS)}")
    counts = {"pairs": 0, "ties": 0, "failed": 0, "below_margin": 0, "position_inconsistent": 0}
    decided, copeland = [], [0] * len(completions)
    for (i, j), verdict in sorted(verdicts.items()):
        if verdict in ("first", "second"):
            win, lose = (i, j) if verdict == "first" else (j, i)
            decided.append((win, lose, (i, j)))
            copeland[win] += 1
            copeland[lose] -= 1
        else:
            counts["ties" if verdict == "tie" else verdict] += 1
    if mode == "best_worst" and decided:
        decided = [max(decided, key=lambda d: copeland[d[0]] - copeland[d[1]])]
    pairs = []
    for win, lose, key in decided:
        row = {"prompt": prompt, "chosen": completions[win], "rejected": completions[lose],
               "copeland_chosen": copeland[win], "copeland_rejected": copeland[lose]}
        if rationales and rationales.get(key):
            row["rationale"] = rationales[key]
        pairs.append(row)
    counts["pairs"] = len(pairs)
    return pairs, counts
