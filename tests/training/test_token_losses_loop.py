"""LD-DPO, WPO and BCO (paired) in the training loop on the tiny model: a few steps lower the loss;
packed rows train like padded ones; bco_pair's baseline moves, is logged and ends in summary.json."""


import pytest

from conftest import metrics_rows, tiny_pairs_config
from preftune.training.train import train


@pytest.mark.parametrize("name, extra", [("ld_dpo", ["loss.ld_alpha=0.3"]), ("wpo", []), ("bco_pair", [])])
def test_a_few_steps_lower_the_loss(tmp_path, tiny_model_dir, name, extra):
    """Step 1 has policy == reference (adapters off at init): LD-DPO's and WPO's pair losses are
    ln 2 (times WPO's weights, < 1); BCO's are 2 ln 2 around a baseline of 0."""
    rows = metrics_rows(train(tiny_pairs_config(tmp_path, tiny_model_dir, name, f"loss.name={name}", "loss.beta=0.5", *extra)).run_dir)
    assert len(rows) == 8
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < first
    if name == "ld_dpo":
        assert first == pytest.approx(0.693147, abs=1e-5)
    if name == "wpo":
        assert 0.0 < rows[0]["wpo/weight"] < 1.0 and first < 0.693147
    if name == "bco_pair":
        assert first == pytest.approx(2 * 0.693147, abs=1e-5) and rows[0]["bco/baseline"] == pytest.approx(0.0, abs=1e-6)
        assert rows[-1]["bco/baseline"] != 0.0


@pytest.mark.parametrize("name", ["ld_dpo", "wpo"])
def test_packed_rows_train_like_padded_rows(tmp_path, tiny_model_dir, name):
    """The tails and weights come from per-token log-probs of packed rows with a shared prompt as
    exactly as from padded rows: the same losses step after step."""
    packed = metrics_rows(train(tiny_pairs_config(tmp_path, tiny_model_dir, "packed", f"loss.name={name}", "train.epochs=2")).run_dir)
    padded = metrics_rows(train(tiny_pairs_config(tmp_path, tiny_model_dir, "padded", f"loss.name={name}", "train.epochs=2", "data.layout=padded")).run_dir)
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], abs=1e-5)


def test_bco_pair_baseline_is_the_mean_of_the_step_rewards_and_is_kept(tmp_path, tiny_model_dir):
    """One micro-batch per step: the baseline after step k is the mean over steps 1..k of each
    step's mean implicit reward (rewards/chosen and rewards/rejected averaged), and summary.json
    keeps the last one."""
    result = train(tiny_pairs_config(tmp_path, tiny_model_dir, "bco", "loss.name=bco_pair", "loss.beta=0.5", "train.epochs=2"))
    rows = metrics_rows(result.run_dir)
    means = [(r["rewards/chosen"] + r["rewards/rejected"]) / 2 for r in rows]
    for k, row in enumerate(rows, start=1):
        assert row["bco/baseline"] == pytest.approx(sum(means[:k]) / k, abs=1e-6)
    assert result.summary["loss_state"]["count"] == len(rows)
    assert result.summary["loss_state"]["mean"] == pytest.approx(rows[-1]["bco/baseline"], abs=1e-6)
    assert "loss_state" not in result.summary["loss_params"]
