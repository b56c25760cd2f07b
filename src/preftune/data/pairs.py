"""Scored samples -> preference pairs. Pure functions; every dropped candidate is counted.

best_worst: per prompt, the highest- vs the lowest-scored sample.
all_pairs:  per prompt, every two samples with different scores (higher = chosen).
Ties (equal scores, or identical texts) are dropped and counted; so are samples whose score is
NaN (a judge that failed) and pairs whose score difference is below `min_margin`.
"""

from __future__ import annotations

import itertools
import math

__all__ = ["build_pairs", "PAIRINGS"]

PAIRINGS = ("best_worst", "all_pairs")


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
