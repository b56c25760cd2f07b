"""`preftune eval` of runs whose loss needs more than summed log-probs: LD-DPO's reference tails
(cached reference sums cannot give them) and bco_pair's running baseline (the run's last one)."""

import json

import pytest

from conftest import PAIRS, write_jsonl
from preftune.cli import main


def _train(tmp_path, model_dir, loss):
    data, run_dir = write_jsonl(tmp_path / "d.jsonl", PAIRS), tmp_path / loss
    assert main(["train", f"data.train_path={data}", f"run.output_dir={run_dir}", f"model.name_or_path={model_dir}",
                 "train.lr=3e-2", "train.epochs=2", "model.lora_r=4", f"loss.name={loss}", "loss.beta=0.5",
                 f"data.eval_path={data}"]) == 0
    return run_dir


def _eval(tmp_path, *args):
    out = tmp_path / "e.json"
    assert main(["eval", "--data", str(tmp_path / "d.jsonl"), "--out", str(out), "eval.kl_prompts=0", *args]) == 0
    return json.loads(out.read_text())


def test_ld_dpo_eval_recomputes_the_reference_when_its_cached_sums_are_there(tmp_path, tiny_model_dir, monkeypatch):
    """The base model's eval stores its log-probs as the reference's of every run trained from it;
    an ld_dpo run's eval reads them but still needs the reference's tails, so it runs the
    reference: the same loss as with the cache turned off."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    run_dir = _train(tmp_path, tiny_model_dir, "ld_dpo")
    _eval(tmp_path, f"model.name_or_path={tiny_model_dir}", "loss.name=ld_dpo")  # stores the base model's log-probs
    cached = _eval(tmp_path, "--run", str(run_dir))
    live = _eval(tmp_path, "--run", str(run_dir), "eval.reuse_reference_logps=false")
    assert cached["reference_logps"] == "read from cache" and "reference_logps" not in live
    assert cached["loss"] == pytest.approx(live["loss"], abs=1e-6)
    assert cached["accuracy/implicit_reward"] == live["accuracy/implicit_reward"]


def test_bco_pair_eval_uses_the_runs_last_baseline(tmp_path, tiny_model_dir):
    run_dir = _train(tmp_path, tiny_model_dir, "bco_pair")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["loss_state"]["count"] == 4 and summary["loss_state"]["mean"] != 0.0
    with_baseline = _eval(tmp_path, "--run", str(run_dir))
    assert with_baseline["loss"] == pytest.approx(summary["eval"]["loss"], abs=1e-6)  # the run's own end-of-run eval
    del summary["loss_state"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert abs(_eval(tmp_path, "--run", str(run_dir))["loss"] - with_baseline["loss"]) > 1e-4  # delta 0 instead
