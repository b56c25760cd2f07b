"""online/bon.py and evaluate.best_of_n_curve: the best row per prompt, failed scores skipped and
counted, the nested best-of-n curve against hand values, and `preftune bon` on the tiny model."""

import json
import math
import shutil

import pytest

from conftest import vowel_reward
from preftune.cli import main
from preftune.core.stats import best_of_n_curve, best_of_n_kl
from preftune.runs.online.bon import best_of_n

NAN = math.nan


def test_best_of_n_keeps_the_highest_finite_score_and_counts_failures():
    texts = ["a", "b", "c", "d", "e", "f"]
    scores = [1.0, NAN, 3.0, NAN, NAN, NAN]  # prompt 1: the NaN is never "best"; prompt 2: nothing scored
    rows, counts = best_of_n(["p1", "p2"], texts, scores, 3, keep_all=True)
    assert [(r["prompt"], r["completion"], r["score"], r["n"]) for r in rows] == [("p1", "c", 3.0, 3)]
    assert counts == {"failed": 4, "prompts_without_score": 1}
    assert rows[0]["candidates"] == [{"completion": "a", "score": 1.0}, {"completion": "b", "score": None},
                                     {"completion": "c", "score": 3.0}]
    json.dumps(rows, allow_nan=False)  # strict JSON: no NaN written


def test_curve_is_the_best_of_the_first_n_draws():
    """Prompt 1 draws 1, 3, 2, 5 -> best of first 1, 2, 4 = 1, 3, 5; prompt 2 draws 4, 0, 6, 1 ->
    4, 4, 6. Means 2.5, 3.5, 5.5; gains over n=1: (2+0)/2 = 1, (4+2)/2 = 3. KL bound log n - (n-1)/n:
    0, log 2 - 1/2, log 4 - 3/4."""
    r = best_of_n_curve([[1, 3, 2, 5], [4, 0, 6, 1]], [4, 1, 2], seed=0)
    assert [c["n"] for c in r["curve"]] == [1, 2, 4]
    assert [c["reward"] for c in r["curve"]] == [2.5, 3.5, 5.5]
    assert [c["gain_vs_1"] for c in r["curve"]] == [0.0, 1.0, 3.0]
    assert [c["kl_bound"] for c in r["curve"]] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    for c in r["curve"]:
        lo, hi = c["reward_ci95"]
        assert lo <= c["reward"] <= hi
    assert r["failed"] == 0 and r["prompts"] == 2 and r["samples_per_prompt"] == 4


def test_curve_skips_and_counts_failed_scores():
    r = best_of_n_curve([[NAN, 2.0], [1.0, NAN]], [1, 2])
    one, two = r["curve"]
    assert one["prompts"] == 1 and one["reward"] == 1.0  # prompt 1 has no finite score among its first 1
    assert two["prompts"] == 2 and two["reward"] == 1.5 and two["gain_vs_1"] == 0.0  # paired on prompt 2 only
    assert r["failed"] == 2
    with pytest.raises(ValueError, match="samples per prompt"):
        best_of_n_curve([[1.0, 2.0]], [4])
    assert best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)


def _bon(tmp_path, tiny_model_dir, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\nI hated\nWhat is the capital of France?\n")
    return main(["bon", str(prompts), "--reward", "fn:conftest:vowel_reward", f"model.name_or_path={tiny_model_dir}",
                 "online.max_new_tokens=8", "train.seed=3", *extra])


def test_bon_cli_best_rows_pairs_and_curve_are_deterministic(tmp_path, tiny_model_dir, capsys):
    args = ["--out", str(tmp_path / "best.jsonl"), "--keep-all", "--pairs", str(tmp_path / "pairs.jsonl"),
            "--eval", "1,2,4", "--eval-out", str(tmp_path / "eval.json")]
    assert _bon(tmp_path, tiny_model_dir, *args) == 0
    printed = capsys.readouterr().out
    assert "n=4" in printed and "KL <=" in printed
    rows = [json.loads(x) for x in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["n"] == 4 and len(r["candidates"]) == 4 for r in rows)
    for r in rows:  # the kept completion is the best candidate under the reward
        scores = vowel_reward(None, [c["completion"] for c in r["candidates"]])
        assert r["score"] == max(scores) == vowel_reward(None, [r["completion"]])[0]
    for p in (json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()):
        assert p["score_chosen"] > p["score_rejected"]
    result = json.loads((tmp_path / "eval.json").read_text())
    rewards = [c["reward"] for c in result["eval"]["curve"]]
    assert rewards == sorted(rewards) and result["eval"]["samples_per_prompt"] == 4
    first = (tmp_path / "best.jsonl").read_text()
    assert _bon(tmp_path, tiny_model_dir, "--out", str(tmp_path / "best.jsonl"), "--keep-all", "-n", "4") == 0
    assert (tmp_path / "best.jsonl").read_text() == first  # same train.seed, same samples, same rows


def test_bon_cli_refuses_an_eval_beyond_its_samples_and_no_output(tmp_path, tiny_model_dir, capsys):
    assert _bon(tmp_path, tiny_model_dir, "--eval", "2,8", "-n", "4") == 2
    assert "needs that many samples" in capsys.readouterr().err
    assert _bon(tmp_path, tiny_model_dir) == 2
    assert "give --out, --pairs or --eval" in capsys.readouterr().err
    assert _bon(tmp_path, tiny_model_dir, "--eval", "1,2.5") == 2


def test_bon_samples_from_a_run_directory_like_from_its_model(tmp_path, tiny_model_dir):
    """A run directory whose model/ is a full model samples exactly as that model does."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "config.yaml").write_text(f"model:\n  name_or_path: {tiny_model_dir}\n")
    assert _bon(tmp_path, tiny_model_dir, "--out", str(tmp_path / "from_run.jsonl"), "--policy", str(run)) == 0
    assert _bon(tmp_path, tiny_model_dir, "--out", str(tmp_path / "from_model.jsonl")) == 0
    assert (tmp_path / "from_run.jsonl").read_text() == (tmp_path / "from_model.jsonl").read_text()
