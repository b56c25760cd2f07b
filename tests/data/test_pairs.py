"""online/pairs.py: pair building, with every drop counted."""

import math

import pytest

from preftune.data.pairs import both_orders, build_pairs, pairs_from_verdicts


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


def test_both_orders_keeps_a_winner_only_when_the_swap_agrees():
    assert both_orders("A", "B") == "first" and both_orders("B", "A") == "second"
    assert both_orders("tie", "tie") == "tie"
    for flipped in (("A", "A"), ("B", "B"), ("A", "tie"), ("tie", "B")):  # the slot, not the text, decided
        assert both_orders(*flipped) == "position_inconsistent"
    assert both_orders(None, "A") == both_orders("B", None) == "failed"


def test_pairs_from_verdicts_drop_inconsistent_ones_and_best_worst_is_a_decided_pair():
    texts = ["w", "x", "y", "z"]
    # decided: 0>1, 0>2, 2>1, 3>1; (0,3) position-inconsistent, (2,3) tie.
    # Copeland: 0 -> +2, 1 -> -3, 2 -> 0, 3 -> +1: best_worst is 0 vs 1 (gap 5)
    verdicts = {(0, 1): "first", (0, 2): "first", (1, 2): "second", (1, 3): "second",
                (0, 3): "position_inconsistent", (2, 3): "tie"}
    pairs, counts = pairs_from_verdicts("p", texts, verdicts, mode="all_pairs", rationales={(0, 1): "why"})
    assert [(r["chosen"], r["rejected"]) for r in pairs] == [("w", "x"), ("w", "y"), ("y", "x"), ("z", "x")]
    assert pairs[0]["rationale"] == "why"
    assert counts == {"pairs": 4, "ties": 1, "failed": 0, "below_margin": 0, "position_inconsistent": 1}
    best, counts = pairs_from_verdicts("p", texts, {**verdicts, (1, 2): "failed"}, mode="best_worst")
    assert [(r["chosen"], r["rejected"], r["copeland_chosen"], r["copeland_rejected"]) for r in best] == [
        ("w", "x", 2, -2)]
    assert counts["pairs"] == 1 and counts["failed"] == 1 and counts["position_inconsistent"] == 1
    none, counts = pairs_from_verdicts("p", texts[:2], {(0, 1): "position_inconsistent"})
    assert none == [] and counts["position_inconsistent"] == 1
