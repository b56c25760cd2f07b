"""Annotator agreement and judgments -> preference pairs. Pure functions over judgment dicts.

Categories are the original responses' labels: "a", "b", "tie" (not the left/right slot).
Cohen's kappa (two annotators, their shared items): (p_o - p_e) / (1 - p_e), p_e from each
annotator's own category rates. Fleiss' kappa (m >= 2 annotators, items rated by all m):
P_i = (sum_j n_ij^2 - m) / (m (m - 1)), P_bar their mean, p_j category shares over all ratings,
P_e = sum_j p_j^2, kappa = (P_bar - P_e) / (1 - P_e). Calibration accuracy: the share of
known-answer items where the annotator preferred the known better response ("a").
Position bias: the share of non-tie judgments that picked the response shown on the left.
Judge vs people (`judge_agreement`): each pair's human label is the most common of its human
judgments (an even split between a and b, or any split with no single winner, is "tie"); the
judge's label comes from asking it in both slot orders (rewards/judge.py `verdict`). Verdicts
that move with the slot (position-inconsistent) or failed are counted and left out; on the
rest, the agreement rate and Cohen's kappa of judge vs human labels.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

__all__ = ["cohen_kappa", "fleiss_kappa", "agreement_report", "build_from_judgments", "human_labels",
           "judge_agreement", "CATEGORIES"]

CATEGORIES = ("a", "b", "tie")


def cohen_kappa(x: list[str], y: list[str]) -> float:
    n = len(x)
    if n == 0:
        return float("nan")
    p_o = sum(a == b for a, b in zip(x, y)) / n
    cx, cy = Counter(x), Counter(y)
    p_e = sum(cx[c] * cy[c] for c in set(cx) | set(cy)) / (n * n)
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(counts: list[list[int]]) -> float:
    """`counts[i][j]`: raters who put item i in category j; every row sums to the same m."""
    if not counts:
        return float("nan")
    m, n = sum(counts[0]), len(counts)
    p_items = [(sum(c * c for c in row) - m) / (m * (m - 1)) for row in counts]
    p_bar = sum(p_items) / n
    shares = [sum(row[j] for row in counts) / (n * m) for j in range(len(counts[0]))]
    p_e = sum(s * s for s in shares)
    return 1.0 if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def agreement_report(judgments: list[dict]) -> dict:
    real = [j for j in judgments if not j["calibration"]]
    by_ann: dict[str, dict[str, str]] = defaultdict(dict)
    for j in real:
        by_ann[j["annotator"]][j["pair_id"]] = j["preferred"]
    annotators = sorted({j["annotator"] for j in judgments})
    per = {}
    for name in annotators:
        mine = [j for j in judgments if j["annotator"] == name]
        cal = [j for j in mine if j["calibration"]]
        decided = [j for j in mine if j["preferred"] != "tie"]
        per[name] = {"judgments": len(mine), "ties": sum(j["preferred"] == "tie" for j in mine),
                     "calibration_items": len(cal),
                     "calibration_accuracy": sum(j["preferred"] == "a" for j in cal) / len(cal) if cal else None,
                     "position_bias": sum(j["preferred"] == j["left"] for j in decided) / len(decided)
                     if decided else None}
    pairwise = {}
    for a, b in itertools.combinations(annotators, 2):
        shared = sorted(set(by_ann[a]) & set(by_ann[b]))
        pairwise[f"{a}|{b}"] = {"items": len(shared), "cohen_kappa": cohen_kappa(
            [by_ann[a][i] for i in shared], [by_ann[b][i] for i in shared]) if shared else None}
    result = {"judgments": len(judgments), "annotators": per, "pairwise": pairwise}
    raters = [a for a in annotators if by_ann[a]]
    if len(raters) > 2:
        common = set.intersection(*(set(by_ann[a]) for a in raters))
        rows = [[sum(by_ann[a][i] == c for a in raters) for c in CATEGORIES] for i in sorted(common)]
        result["fleiss_kappa"] = {"items": len(rows), "raters": len(raters),
                                  "kappa": fleiss_kappa(rows) if rows else None}
    decided = [j for j in judgments if j["preferred"] != "tie"]
    result["position_bias"] = sum(j["preferred"] == j["left"] for j in decided) / len(decided) if decided else None
    return result


def build_from_judgments(judgments: list[dict], items: dict, *, min_votes: int = 2, min_agreement: float = 0.5,
                         min_margin: int = 1) -> tuple[list[dict], dict]:
    """Majority vote per pair (calibration items excluded). Kept when at least `min_votes`
    judged it, the winner's votes are more than `min_agreement` of all votes (ties count as votes),
    and the winner leads the loser by at least `min_margin` votes. `items` maps pair_id -> an
    object with prompt, a, b. Returns (pairs, dropped counts by reason)."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for j in judgments:
        if not j["calibration"]:
            votes[j["pair_id"]][j["preferred"]] += 1
    pairs = []
    dropped = {"too_few_votes": 0, "tie": 0, "low_agreement": 0, "small_margin": 0}
    for pid in sorted(votes, key=lambda p: list(items).index(p) if p in items else 0):
        v = votes[pid]
        total = sum(v.values())
        winner, loser = ("a", "b") if v["a"] >= v["b"] else ("b", "a")
        if total < min_votes:
            dropped["too_few_votes"] += 1
        elif v["a"] == v["b"]:
            dropped["tie"] += 1
        elif v[winner] / total <= min_agreement:
            dropped["low_agreement"] += 1
        elif v[winner] - v[loser] < min_margin:
            dropped["small_margin"] += 1
        else:
            it = items[pid]
            pairs.append({"prompt": it.prompt, "chosen": getattr(it, winner), "rejected": getattr(it, loser),
                          "pair_id": pid, "votes": dict(v), "agreement": v[winner] / total})
    return pairs, {"kept": len(pairs), **dropped}


def human_labels(judgments: list[dict]) -> dict[str, str]:
    """pair_id -> the most common human label ("tie" when no single label has the most votes);
    calibration items excluded."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for j in judgments:
        if not j["calibration"]:
            votes[j["pair_id"]][j["preferred"]] += 1
    labels = {}
    for pid, v in votes.items():
        (top, n), *rest = v.most_common()
        labels[pid] = "tie" if rest and rest[0][1] == n else top
    return labels


def judge_agreement(humans: dict[str, str], judge: dict[str, str]) -> dict:
    """Agreement of a judge's labels with people's, on the pairs both labelled.

    `humans`: pair_id -> "a" | "b" | "tie" (`human_labels`); `judge`: pair_id -> "a" | "b" | "tie"
    | "position_inconsistent" | "failed"."""
    shared = [pid for pid in humans if pid in judge]
    usable = [pid for pid in shared if judge[pid] in CATEGORIES]
    x, y = [humans[pid] for pid in usable], [judge[pid] for pid in usable]
    return {"items": len(shared), "compared": len(usable),
            "position_inconsistent": sum(judge[pid] == "position_inconsistent" for pid in shared),
            "failed": sum(judge[pid] == "failed" for pid in shared),
            "agreement": sum(a == b for a, b in zip(x, y)) / len(usable) if usable else None,
            "cohen_kappa": cohen_kappa(x, y) if usable else None,
            "judge_ties": y.count("tie"), "human_ties": x.count("tie")}
