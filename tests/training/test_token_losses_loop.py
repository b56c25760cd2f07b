"""LD-DPO, WPO and BCO (paired) in the training loop on the tiny model: a few steps lower the loss;
packed rows train like padded ones; bco_pair's baseline moves, is logged and ends in summary.json."""

import json

import pytest

from conftest import PAIRS, write_jsonl
from preftune.config import load_config
from preftune.training.train import train


def _cfg(tmp_path, model_dir, name, *extra):
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_jsonl(data, PAIRS)
    return load_config(None, [f"model.name_or_path={model_dir}", f"data.train_path={data}",
                              f"run.output_dir={tmp_path / name}", "data.max_length=64", "data.max_prompt_length=32",
                              "train.lr=1e-2", "model.lora_r=4", "model.lora_alpha=8", "train.batch_size=4",
                              "train.epochs=4", *extra])


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name, extra", [("ld_dpo", ["loss.ld_alpha=0.3"]), ("wpo", []), ("bco_pair", [])])
def test_a_few_steps_lower_the_loss(tmp_path, tiny_model_dir, name, extra):
    """Step 1 has policy == reference (adapters off at init): LD-DPO's and WPO's pair losses are
    ln 2 (times WPO's weights, < 1); BCO's are 2 ln 2 around a baseline of 0."""
    rows = _rows(train(_cfg(tmp_path, tiny_model_dir, name, f"loss.name={name}", "loss.beta=0.5", *extra)).run_dir)
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
    packed = _rows(train(_cfg(tmp_path, tiny_model_dir, "packed", f"loss.name={name}", "train.epochs=2")).run_dir)
    padded = _rows(train(_cfg(tmp_path, tiny_model_dir, "padded", f"loss.name={name}", "train.epochs=2", "data.layout=padded")).run_dir)
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], abs=1e-5)


def test_bco_pair_baseline_is_the_mean_of_the_step_rewards_and_is_kept(tmp_path, tiny_model_dir):
    """One micro-batch per step: the baseline after step k is the mean over steps 1..k of each
    step's mean implicit reward (rewards/chosen and rewards/rejected averaged), and summary.json
    keeps the last one."""
    result = train(_cfg(tmp_path, tiny_model_dir, "bco", "loss.name=bco_pair", "loss.beta=0.5", "train.epochs=2"))
    rows = _rows(result.run_dir)
    means = [(r["rewards/chosen"] + r["rewards/rejected"]) / 2 for r in rows]
    for k, row in enumerate(rows, start=1):
        assert row["bco/baseline"] == pytest.approx(sum(means[:k]) / k, abs=1e-6)
    assert result.summary["loss_state"]["count"] == len(rows)
    assert result.summary["loss_state"]["mean"] == pytest.approx(rows[-1]["bco/baseline"], abs=1e-6)
    assert "loss_state" not in result.summary["loss_params"]
