import json

import pytest

from preftune.apps.demo import bootstrap_ci, demo_prompts, run_demo
from preftune.data.pairs import build_pairs
from preftune.models.rewards import sentiment_scores


def test_prompts_are_ours_and_held_out_prompts_are_unseen():
    train, held = demo_prompts()
    assert (len(train), len(held)) == (96, 24)
    assert not set(train) & set(held) and len(set(train + held)) == 120


def test_sentiment_reward_orders_obvious_texts():
    good, bad, flat = sentiment_scores(["a wonderful, beautiful film", "a terrible, awful mess", "a film"])
    assert good > 0.5 and bad < -0.5 and flat == 0.0


def test_demo_pairing_is_best_vs_worst_without_near_ties():
    (pair,), _ = build_pairs("p", ["meh", "great", "awful"], [0.0, 0.9, -0.7], mode="best_worst", min_margin=0.1)
    assert (pair["chosen"], pair["rejected"]) == ("great", "awful")
    pairs, counts = build_pairs("p", ["a", "b"], [0.30, 0.35], mode="best_worst", min_margin=0.1)
    assert pairs == [] and counts["below_margin"] == 1


def test_bootstrap_interval():
    lo, hi = bootstrap_ci([1.0] * 10)
    assert lo == hi == 1.0
    lo, hi = bootstrap_ci([0.0, 1.0] * 50, seed=3)
    assert 0.38 < lo < 0.5 < hi < 0.62


def test_quick_demo_runs_every_step_on_a_tiny_model(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Every step runs, and the printed figures are the means of what the scorer returned: the
    quick demo scores its one round's 8 x 2 samples at once, then 4 reference and 4 policy groups
    of 2 samples."""
    import preftune.models.rewards

    # a random tiny model writes no sentiment words; score by a text's bytes so pairs exist
    calls = []

    def score(texts):
        calls.append([sum(t.encode()) % 97 / 97 for t in texts])
        return calls[-1]

    monkeypatch.setattr(preftune.models.rewards, "sentiment_scores", score)
    out = tmp_path / "demo"
    summary = run_demo(out, quick=True, model=str(tiny_model_dir))
    saved = json.loads((out / "demo.json").read_text())
    assert len(calls) == 1 + 4 + 4 and len(calls[0]) == 16 and all(len(c) == 2 for c in calls[1:])
    reference, policy = calls[1:5], calls[5:]
    assert saved["reward_reference"] == pytest.approx(sum(map(sum, reference)) / 8)
    assert saved["reward_policy"] == pytest.approx(sum(map(sum, policy)) / 8)
    assert saved["reward_gain"] == pytest.approx((sum(map(sum, policy)) - sum(map(sum, reference))) / 8)
    gains = [sum(p) / 2 - sum(r) / 2 for p, r in zip(policy, reference)]
    assert min(gains) - 1e-9 <= saved["reward_gain_ci95"][0] <= saved["reward_gain_ci95"][1] <= max(gains) + 1e-9
    assert [row["policy"] - row["reference"] for row in saved["per_prompt"]] == pytest.approx(gains)
    assert saved == json.loads(json.dumps(summary))
    assert (out / "round-1" / "train" / "model" / "adapter_model.safetensors").is_file()
    assert not (out / "round-1" / "policy").exists()  # one round: nothing starts from a merged copy
    assert f"{saved['reward_gain']:+.3f}" in capsys.readouterr().out
    run_demo(out, quick=True, model=str(tiny_model_dir))  # a second run replaces its own directory
