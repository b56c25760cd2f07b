"""apps/eval.py's paired before/after statistics from per-pair rows, without a model: which
"before" is used, how a baseline file's pairs are matched and checked, and the table's lines."""

import json

import pytest

from preftune.apps.eval import format_eval, paired_block, read_per_pair
from preftune.core.stats import paired_gain
from preftune.utils.errors import ConfigError, DataError


def _rows(implicit, logp, reference=None, start_line=1):
    return [{"line": start_line + k, "pair": f"k{start_line + k}", "implicit_correct": i, "implicit_margin": None,
             "logp_correct": lp, "logp_margin": 0.0, "reference_logp_correct": None if reference is None else reference[k],
             "reference_logp_margin": None} for k, (i, lp) in enumerate(zip(implicit, logp))]


def test_a_run_with_a_reference_is_paired_against_it_in_the_same_call():
    """Implicit after [1, 1, 1, 0, 1], reference log-prob [0, 1, 0, 0, 1]: gain 0.8 - 0.4 = +0.4,
    2 gained and 0 lost (McNemar p = 2 * 1/4 = 0.5); the policy's own log-prob [0, 1, 1, 0, 1]
    vs the reference's: +0.2, 1 gained (p = 1)."""
    rows = _rows([1.0, 1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0, 1.0], reference=[0.0, 1.0, 0.0, 0.0, 1.0])
    p = paired_block(rows)
    assert p["before"].startswith("the run's reference") and (p["pairs"], p["unmatched"]) == (5, 0)
    g = p["gain"]
    assert (g["before"], g["after"], g["gain"], g["gained"], g["lost"], g["mcnemar_p"]) == \
        (0.4, 0.8, pytest.approx(0.4), 2, 0, 0.5)
    assert g["compares"] == "implicit-reward accuracy after vs log-prob accuracy before"
    assert g["gain_ci95"] == paired_gain([0.0, 1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0, 1.0])["gain_ci95"]
    lg = p["logp_gain"]
    assert (lg["gain"], lg["gained"], lg["lost"], lg["mcnemar_p"]) == (pytest.approx(0.2), 1, 0, 1.0)
    # a base model (implicit undefined, no reference of its own) or a reference-free loss: nothing to pair with
    assert paired_block(_rows([None] * 3, [1.0, 0.0, 1.0])) is None
    assert paired_block(_rows([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])) is None


def test_a_baseline_file_is_matched_by_line_and_pair_and_its_defined_outcome_is_the_before():
    after = _rows([1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0], reference=[0.0, 0.0, 0.0, 0.0])
    base = _rows([None] * 3, [0.0, 1.0, 0.0], start_line=2)  # a base eval of lines 2-4 only
    p = paired_block(after, base, "before.jsonl")
    assert (p["before"], p["pairs"], p["unmatched"]) == ("before.jsonl", 3, 1)  # line 1 is not in it
    # lines 2-4: implicit after [1, 0, 1] vs the base's log-prob [0, 1, 0] (its implicit is undefined)
    assert (p["gain"]["before"], p["gain"]["after"], p["gain"]["gained"], p["gain"]["lost"]) == \
        (pytest.approx(1 / 3), pytest.approx(2 / 3), 2, 1)
    assert p["gain"]["compares"].endswith("log-prob accuracy before")
    other_run = _rows([0.0, 0.0, 0.0], [0.0, 1.0, 0.0], start_line=2)  # another run: its implicit outcome is the before
    q = paired_block(after, other_run, "run-b.jsonl")
    assert q["gain"]["before"] == 0.0 and q["gain"]["compares"].endswith("implicit-reward accuracy before")
    moved = [{**r, "pair": "other"} for r in base]  # the same lines of another file or tokenizer
    with pytest.raises(ConfigError, match="none of its pairs is among the 4 evaluated"):
        paired_block(after, moved, "before.jsonl")


def test_read_per_pair_round_trips_and_names_the_bad_line(tmp_path):
    rows = _rows([None, None], [1.0, 0.5])
    good = tmp_path / "p.jsonl"
    good.write_text("".join(json.dumps({"data": "d.jsonl", **r}) + "\n" for r in rows))
    assert [r["logp_correct"] for r in read_per_pair(str(good))] == [1.0, 0.5]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "logp_correct": 0.7}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: logp_correct: missing or not valid \(0.7\)"):
        read_per_pair(str(bad))
    (tmp_path / "eval.json").write_text(json.dumps({"pairs": 3}, indent=2))  # the eval's JSON, not its per-pair file
    with pytest.raises(DataError, match="eval.json:1: json: not JSON"):
        read_per_pair(str(tmp_path / "eval.json"))
    with pytest.raises(ConfigError, match="--baseline: cannot read"):
        read_per_pair(str(tmp_path / "absent.jsonl"))


def test_the_table_shows_the_paired_gain():
    rows = _rows([1.0, 1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0, 1.0], reference=[0.0, 1.0, 0.0, 0.0, 1.0])
    result = {"data": "d.jsonl", "run": "r", "pairs": 5, "accuracy/implicit_reward": 0.8,
              "accuracy/implicit_reward_ci95": [0.4, 0.96], "accuracy/logp": 0.6, "accuracy/logp_ci95": [0.2, 0.9],
              "rewards/margins": 0.1, "perplexity/chosen": 9.0, "paired": paired_block(rows)}
    lines = format_eval(result).splitlines()
    assert lines[2].index("0.600") == lines[4].index("+0.400") + 1  # the values line up with the accuracies'
    assert lines[4].startswith("  " + "gain, paired".ljust(26) + "+0.400 [")
    assert "McNemar p=0.5 (2 gained, 0 lost; 0.400 -> 0.800)" in lines[4]
    assert lines[5].startswith("  " + "log-prob gain, paired".ljust(26) + "+0.200 [")
    assert lines[6] == "  (before: the run's reference (its start), same forward passes; 5 pairs; 95% bootstrap over pairs)"


def test_the_table_shows_the_win_rate_with_its_interval_over_prompts():
    result = {"data": "d.jsonl", "run": "r", "pairs": 5, "accuracy/implicit_reward": 0.8,
              "accuracy/implicit_reward_ci95": [0.4, 0.96], "accuracy/logp": 0.6, "accuracy/logp_ci95": [0.2, 0.9],
              "rewards/margins": 0.1, "perplexity/chosen": 9.0, "win_rate": 0.625, "win_rate/ci95": [0.5, 0.75],
              "reward/source": "rm:runs/rm"}
    assert format_eval(result).splitlines()[-1] == \
        "  win rate vs reference      0.625 [0.500, 0.750] over prompts (rm:runs/rm)"
    nan = float("nan")  # an eval JSON from before the interval, or one where every score failed: no interval
    assert format_eval({**result, "win_rate/ci95": [nan, nan]}).splitlines()[-1].endswith("0.625 (rm:runs/rm)")


def test_before_and_after_through_the_cli_agree_in_one_call_and_in_two(tmp_path, capsys, tiny_model_dir, monkeypatch):
    """`eval --per-pair` of the base model, then of a run: the run's default "before" (its
    reference, read in the same forward passes) and the base eval's per-pair file give the same
    before outcomes, so the two ways give the same paired gain."""
    from conftest import PAIRS, write_jsonl
    from preftune.cli import main

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    data, held = write_jsonl(tmp_path / "d.jsonl", PAIRS), write_jsonl(tmp_path / "held.jsonl", PAIRS[2:])
    before_pairs, out = tmp_path / "before.jsonl", tmp_path / "e.json"
    assert main(["eval", "--data", str(held), "--out", str(out), "--per-pair", str(before_pairs),
                 f"model.name_or_path={tiny_model_dir}", "eval.kl_prompts=0"]) == 0
    base = json.loads(out.read_text())
    rows = read_per_pair(str(before_pairs))
    assert len(rows) == base["pairs"] == 6 and "paired" not in base  # nothing to pair a base model with
    assert all(r["implicit_correct"] is None and r["data"] == str(held) for r in rows)
    run_dir = tmp_path / "run"
    assert main(["train", f"data.train_path={data}", f"run.output_dir={run_dir}", f"model.name_or_path={tiny_model_dir}",
                 "train.lr=3e-2", "train.epochs=2", "model.lora_r=4"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir), "--data", str(held), "--out", str(out), "--per-pair",
                 str(tmp_path / "after.jsonl"), "eval.kl_prompts=0"]) == 0
    one_call = json.loads(out.read_text())["paired"]
    assert "gain, paired" in capsys.readouterr().out
    assert one_call["gain"]["before"] == pytest.approx(base["accuracy/logp"])  # the reference is the base model
    after_rows = read_per_pair(str(tmp_path / "after.jsonl"))
    assert [r["reference_logp_correct"] for r in after_rows] == [r["logp_correct"] for r in rows]
    assert main(["eval", "--run", str(run_dir), "--data", str(held), "--out", str(out), "--baseline",
                 str(before_pairs), "eval.kl_prompts=0"]) == 0
    two_calls = json.loads(out.read_text())["paired"]
    assert (two_calls["before"], two_calls["pairs"], two_calls["unmatched"]) == (str(before_pairs), 6, 0)
    for key in ("gain", "logp_gain"):
        assert {k: v for k, v in two_calls[key].items()} == one_call[key], key
