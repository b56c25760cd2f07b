"""label/agree.py: kappas against hand computations, and majority-vote pair building."""

import pytest

from preftune.label import LabelItem
from preftune.label.agree import agreement_report, build_from_judgments, cohen_kappa, fleiss_kappa


def test_cohen_kappa_hand_example():
    # p_o = 5/6; rates x: a 3, b 2, tie 1; y: a 2, b 3, tie 1 -> p_e = (6 + 6 + 1) / 36 = 13/36
    # kappa = (30/36 - 13/36) / (23/36) = 17/23
    x = ["a", "a", "b", "b", "tie", "a"]
    y = ["a", "b", "b", "b", "tie", "a"]
    assert cohen_kappa(x, y) == pytest.approx(17 / 23)
    assert cohen_kappa(x, x) == 1.0


def test_fleiss_kappa_hand_example():
    # 3 raters, 4 items over (a, b, tie): P_i = 1, 1, 1/3, 0 -> P_bar = 7/12
    # shares a 6/12, b 5/12, tie 1/12 -> P_e = 62/144; kappa = (84 - 62) / (144 - 62) = 11/41
    rows = [[3, 0, 0], [0, 3, 0], [2, 1, 0], [1, 1, 1]]
    assert fleiss_kappa(rows) == pytest.approx(11 / 41)


def _j(annotator, pair, preferred, left="a", calibration=False):
    return {"annotator": annotator, "pair_id": pair, "preferred": preferred, "left": left, "calibration": calibration}


def test_agreement_report_calibration_and_position_bias():
    js = [_j("ann", "p1", "a", left="a"), _j("ann", "p2", "b", left="a"), _j("ann", "p3", "a", left="a"),
          _j("bob", "p1", "a", left="b"), _j("bob", "p2", "b", left="b"), _j("bob", "p3", "b", left="b"),
          _j("ann", "cal-1", "a", calibration=True), _j("bob", "cal-1", "b", calibration=True),
          _j("cat", "p1", "a"), _j("cat", "p2", "b"), _j("cat", "p3", "tie")]
    r = agreement_report(js)
    assert r["annotators"]["ann"]["calibration_accuracy"] == 1.0
    assert r["annotators"]["bob"]["calibration_accuracy"] == 0.0
    assert r["annotators"]["ann"]["position_bias"] == pytest.approx(3 / 4)  # 3 of 4 decided picks were left
    assert r["pairwise"]["ann|bob"]["items"] == 3
    assert r["pairwise"]["ann|bob"]["cohen_kappa"] == pytest.approx(cohen_kappa(["a", "b", "a"], ["a", "b", "b"]))
    assert r["fleiss_kappa"]["items"] == 3 and r["fleiss_kappa"]["raters"] == 3


def test_build_majority_vote_and_drop_counts():
    items = {p: LabelItem(p, f"prompt {p}", f"{p}-a", f"{p}-b") for p in ("p1", "p2", "p3", "p4", "p5")}
    js = ([_j(x, "p1", "a") for x in "xyz"] +                       # 3-0: kept, chosen = a
          [_j("x", "p2", "b"), _j("y", "p2", "b"), _j("z", "p2", "a")] +  # 2-1: 2/3 > 0.5, kept, chosen = b
          [_j("x", "p3", "a"), _j("y", "p3", "b")] +                # 1-1: tie
          [_j("x", "p4", "a")] +                                    # one vote: too few
          [_j("x", "p5", "a"), _j("y", "p5", "tie"), _j("z", "p5", "tie")] +  # 1/3 agreement: low
          [_j("x", "cal-1", "a", calibration=True)])
    pairs, counts = build_from_judgments(js, items, min_votes=2, min_agreement=0.5)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("prompt p1", "p1-a", "p1-b"), ("prompt p2", "p2-b", "p2-a")]
    assert counts == {"kept": 2, "too_few_votes": 1, "tie": 1, "low_agreement": 1, "small_margin": 0}
    _, strict = build_from_judgments(js, items, min_votes=2, min_agreement=0.5, min_margin=2)
    assert strict["kept"] == 1 and strict["small_margin"] == 1  # p2 leads by one vote only
