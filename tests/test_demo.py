import json

import pytest

from preftune.demo import best_vs_worst, bootstrap_ci, demo_prompts, run_demo, sentiment_scores


def test_prompts_are_ours_and_held_out_prompts_are_unseen():
    train, held = demo_prompts()
    assert (len(train), len(held)) == (96, 24)
    assert not set(train) & set(held) and len(set(train + held)) == 120


def test_sentiment_reward_orders_obvious_texts():
    good, bad, flat = sentiment_scores(["a wonderful, beautiful film", "a terrible, awful mess", "a film"])
    assert good > 0.5 and bad < -0.5 and flat == 0.0


def test_best_vs_worst_and_near_ties():
    pair = best_vs_worst("p", ["meh", "great", "awful"], [0.0, 0.9, -0.7], min_margin=0.1)
    assert (pair["chosen"], pair["rejected"]) == ("great", "awful")
    assert best_vs_worst("p", ["a", "b"], [0.30, 0.35], min_margin=0.1) is None


def test_bootstrap_interval():
    lo, hi = bootstrap_ci([1.0] * 10)
    assert lo == hi == 1.0
    lo, hi = bootstrap_ci([0.0, 1.0] * 50, seed=3)
    assert 0.38 < lo < 0.5 < hi < 0.62


def test_quick_demo_runs_every_step_on_a_tiny_model(tmp_path, tiny_model_dir, capsys, monkeypatch):
    # a random tiny model writes no sentiment words; score by a text's bytes so pairs exist
    import preftune.demo

    monkeypatch.setattr(preftune.demo, "sentiment_scores", lambda texts: [sum(t.encode()) % 97 / 97 for t in texts])
    out = tmp_path / "demo"
    summary = run_demo(out, quick=True, model=str(tiny_model_dir))
    saved = json.loads((out / "demo.json").read_text())
    assert saved["reward_gain"] == pytest.approx(summary["reward_policy"] - summary["reward_reference"])
    assert (out / "train" / "model" / "adapter_model.safetensors").is_file()
    assert "reward gain" in capsys.readouterr().out
    run_demo(out, quick=True, model=str(tiny_model_dir))  # a second run replaces its own directory
