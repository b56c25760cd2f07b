"""label/agree.py: kappas against hand computations, and majority-vote pair building."""

import json

import pytest

from conftest import PairwiseJudge, write_jsonl
from preftune.apps.label import LabelItem
from preftune.apps.label.agree import (
    agreement_report,
    build_from_judgments,
    cohen_kappa,
    fleiss_kappa,
    human_labels,
    judge_agreement,
)
from preftune.cli import main


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


def test_human_labels_are_the_majority_and_a_split_is_a_tie():
    js = [_j("x", "p1", "a"), _j("y", "p1", "a"), _j("z", "p1", "b"),   # a 2-1
          _j("x", "p2", "a"), _j("y", "p2", "b"),                      # split: tie
          _j("x", "p3", "tie"), _j("x", "cal-1", "b", calibration=True)]
    assert human_labels(js) == {"p1": "a", "p2": "tie", "p3": "tie"}


def test_judge_agreement_leaves_out_inconsistent_and_failed_verdicts():
    # compared p1..p4: humans a, b, a, tie; judge a, b, b, tie -> agreement 3/4.
    # kappa: p_o = 3/4; humans a 2, b 1, tie 1; judge a 1, b 2, tie 1 -> p_e = (2 + 2 + 1)/16 = 5/16
    # kappa = (12/16 - 5/16) / (11/16) = 7/11
    humans = {"p1": "a", "p2": "b", "p3": "a", "p4": "tie", "p5": "a", "p6": "b", "p7": "a"}
    judge = {"p1": "a", "p2": "b", "p3": "b", "p4": "tie", "p5": "position_inconsistent", "p6": "failed"}
    r = judge_agreement(humans, judge)
    assert r["items"] == 6 and r["compared"] == 4 and r["position_inconsistent"] == 1 and r["failed"] == 1
    assert r["agreement"] == 0.75 and r["cohen_kappa"] == pytest.approx(7 / 11)
    assert judge_agreement({"p1": "a"}, {"p1": "failed"})["agreement"] is None


def test_data_agree_with_a_position_biased_judge(tmp_path, capsys):
    """The fake judge prefers the response with "good" in it, except on the `slot` item, where
    it always answers "A": that verdict moves with the order, is counted and not compared."""
    items = [{"id": "p1", "prompt": "q1", "response_a": "a good one", "response_b": "meh"},
             {"id": "p2", "prompt": "q2", "response_a": "meh", "response_b": "good stuff"},
             {"id": "p3", "prompt": "q3", "response_a": "good slot", "response_b": "fine"},
             {"id": "p4", "prompt": "q4", "response_a": "x", "response_b": "y"}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", items)
    js = write_jsonl(tmp_path / "j.jsonl", [_j("ann", "p1", "a"), _j("ann", "p2", "a"), _j("ann", "p3", "a"),
                                            _j("bob", "p1", "a")])

    def decide(a, b):
        if "slot" in a + b:
            return "A"
        return "A" if "good" in a else "B" if "good" in b else "tie"

    judge = PairwiseJudge(decide)
    try:
        assert main(["data", "agree", str(js), "--pairs", str(pairs), "--judge", f"judge:{judge.url}#m"]) == 0
    finally:
        judge.close()
    r = json.loads(capsys.readouterr().out)["judge"]
    # p4 has no human label: not asked. p1 a/a, p2 human a vs judge b, p3 inconsistent
    assert len(judge.shown) == 6 and r["items"] == 3 and r["compared"] == 2 and r["position_inconsistent"] == 1
    assert r["agreement"] == 0.5 and r["calls"]["failures"] == 0
    assert main(["data", "agree", str(js), "--judge", "judge:http://127.0.0.1:9/v1"]) == 2
    assert "needs --pairs" in capsys.readouterr().err
