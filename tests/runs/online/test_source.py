"""Online DPO through train()'s one loop: the NaN guard, checkpoints and exact resume after
SIGKILL, probes and health checks, stop_on, and a reward that never ranks anything."""

import json

import pytest

from conftest import PAIRS, kill_and_resume_trials, metrics_rows, write_jsonl
from preftune.cli import main
from preftune.config import load_config
from preftune.core.losses import build_loss
from preftune.models.rewards import build_reward
from preftune.runs.online.source import MAX_ATTEMPTS, OnlineSource

PROMPTS = ["The movie was", "I hated", "What is the capital of France?", "Human: how do I bake bread?",
           "The soundtrack was", "My review:"]


def _args(tmp_path, model_dir, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return [f"model.name_or_path={model_dir}", f"online.prompts_path={prompts}", "online.reward=fn:conftest:length_reward",
            "online.max_new_tokens=6", "online.samples_per_prompt=3", "online.prompts_per_step=2", "model.lora_r=4",
            "train.lr=1e-2", "train.max_steps=6", "diagnostics.probe_every=0", "data.max_length=64",
            "data.max_prompt_length=32", *extra]


def test_online_runs_log_probes_health_and_checkpoints_like_train(tmp_path, tiny_model_dir):
    held_out = write_jsonl(tmp_path / "dev.jsonl", PAIRS[:4])
    run = tmp_path / "on"
    assert main(["online", *_args(tmp_path, tiny_model_dir, f"run.output_dir={run}", "diagnostics.probe_every=3",
                                  f"data.eval_path={held_out}", "train.checkpoint_every=2",
                                  "train.grad_accum=2")]) == 0
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["online/draws"] >= 2 and r["online/samples"] == 6 * r["online/draws"] for r in rows)  # 2 micro-batches
    assert all("health" in r for r in rows) and rows[0]["lr"] > rows[3]["lr"] > rows[-1]["lr"]  # the cosine schedule runs
    probed = [r for r in rows if "probe/kl" in r]
    assert [r["step"] for r in probed] == [3, 6] and all("probe/eval_accuracy" in r for r in probed)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["source"] == "online" and summary["eval"]["pairs"] == 4
    assert summary["layout"]["layout"] == "packed" and (run / "model" / "adapter_model.safetensors").is_file()
    assert load_config(run / "config.yaml").online.prompts_per_step == 2


def test_online_stop_on_ends_the_run_at_the_check(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "on"
    assert main(["online", *_args(tmp_path, tiny_model_dir, f"run.output_dir={run}", "diagnostics.probe_every=2",
                                  "diagnostics.kl_max=-1", "diagnostics.stop_on=[kl_drift]")]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_early"] == {"check": "kl_drift", "step": 2} and len(metrics_rows(run)) == 2
    assert "stopping early: kl_drift at step 2" in capsys.readouterr().out


def test_online_nan_exits_3_with_one_line_and_only_finite_checkpoints(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "on"
    rc = main(["online", *_args(tmp_path, tiny_model_dir, f"run.output_dir={run}", "train.lr=1e30",
                                "train.max_grad_norm=0", "train.max_steps=30", "train.checkpoint_every=1")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1 and "is not finite" in err[0] and "step-" in err[0]
    assert not (run / "model").exists() and (run / "checkpoints").is_dir()


def test_online_interrupted_then_resumed_is_bit_identical(tmp_path, tiny_model_dir, monkeypatch):
    """In-process and fast: stopped right after its step-3 checkpoint, resumed, equal to a run
    that was never stopped (weights and every logged row)."""
    from conftest import interrupt_after_checkpoint, weights_sha
    from preftune.runs.online.source import run_online

    def cfg(name):
        return load_config(None, [*_args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / name}",
                                         "train.checkpoint_every=1", "model.lora_dropout=0.1")])

    full = run_online(cfg("full"))
    interrupt_after_checkpoint(monkeypatch, 3, lambda: run_online(cfg("cut")))
    resumed = run_online(cfg("cut"), resume=True)
    assert resumed.summary["resumed_from"].endswith("step-00000003")
    assert weights_sha(resumed.run_dir) == weights_sha(full.run_dir)
    assert metrics_rows(resumed.run_dir) == metrics_rows(full.run_dir)


@pytest.mark.slow
def test_online_sigkill_then_resume_is_bit_identical(tmp_path, tiny_model_dir):
    args = _args(tmp_path, tiny_model_dir, "train.checkpoint_every=1", "train.max_steps=8", "model.lora_dropout=0.1")
    outcomes = kill_and_resume_trials(tmp_path, "online", args, trials=2, seed=3)
    assert all(same for same, *_ in outcomes), outcomes


def test_a_reward_that_never_ranks_stops_with_one_line(tmp_path, tiny_model_dir, capsys):
    rc = main(["online", *_args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / 'on'}",
                                "online.reward=fn:conftest:constant_reward")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{MAX_ATTEMPTS} draws" in err[0]


@pytest.mark.parametrize("extra, key", [(["loss.name=kto"], "loss.name"), (["train.max_steps=0"], "train.max_steps")])
def test_online_needs_pairs_and_a_length(tmp_path, extra, key):
    cfg = load_config(None, extra)
    with pytest.raises(Exception, match=key):
        OnlineSource(cfg, build_loss(cfg.loss.name), PROMPTS, build_reward("fn:conftest:length_reward"))
