"""online/pairs.py: pair building, with every drop counted."""

import math

import pytest

from preftune.data.pairs import build_pairs


def test_best_vs_worst():
    pairs, counts = build_pairs("p", ["a", "b", "c"], [0.2, 0.9, -0.5])
    assert [(x["chosen"], x["rejected"]) for x in pairs] == [("b", "c")]
    assert pairs[0]["score_chosen"] == 0.9 and counts == {"pairs": 1, "ties": 0, "failed": 0, "below_margin": 0}


def test_all_pairs_orders_by_score_and_drops_ties():
    pairs, counts = build_pairs("p", ["a", "b", "c", "d"], [1.0, 3.0, 1.0, 2.0], mode="all_pairs")
    got = {(x["chosen"], x["rejected"]) for x in pairs}
    assert got == {("b", "a"), ("b", "c"), ("b", "d"), ("d", "a"), ("d", "c")}
    assert counts == {"pairs": 5, "ties": 1, "failed": 0, "below_margin": 0}  # a vs c tie


def test_margin_filter_failed_scores_and_identical_texts():
    pairs, counts = build_pairs("p", ["a", "b", "c"], [0.5, 0.55, math.nan], mode="all_pairs", min_margin=0.1)
    assert pairs == [] and counts == {"pairs": 0, "ties": 0, "failed": 1, "below_margin": 1}
    pairs, counts = build_pairs("p", ["same", "same"], [1.0, 0.0])
    assert pairs == [] and counts["ties"] == 1
    pairs, counts = build_pairs("p", ["a", "b"], [math.nan, 1.0])
    assert pairs == [] and counts["failed"] == 1
    with pytest.raises(ValueError, match="unknown pairing"):
        build_pairs("p", ["a", "b"], [0.0, 1.0], mode="sideways")


def test_rationales_travel_with_the_pair():
    pairs, _ = build_pairs("p", ["a", "b"], [2.0, 7.0], rationales=["meh", "clear"])
    assert pairs[0]["rationale_chosen"] == "clear" and pairs[0]["rationale_rejected"] == "meh"
