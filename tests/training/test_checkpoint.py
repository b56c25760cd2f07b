"""Atomic checkpoints and exact resume (RELIABILITY.md B1-B6, C1)."""

import json
import sys

import pytest
from safetensors.torch import load_file

from conftest import PAIRS, kill_and_resume_trials, tiny_pairs_config, weights_sha, write_jsonl
from preftune.training.checkpoint import find_checkpoint
from preftune.training.train import train
from preftune.utils.errors import ConfigError, NumericalError


def _cfg(tmp_path, model_dir, name="run", *extra):
    return tiny_pairs_config(tmp_path, model_dir, name, "train.checkpoint_every=1", "train.keep_last=2", *extra,
                             batch_size=3, epochs=3)


def losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    pass


def _interrupt_after(monkeypatch, step):
    import preftune.training.train  # noqa: F401

    module = sys.modules["preftune.training.train"]
    real = module.save_checkpoint

    def save_then_die(run_dir, **kw):
        path = real(run_dir, **kw)
        if kw["step"] == step:
            raise Killed(step)
        return path

    monkeypatch.setattr(module, "save_checkpoint", save_then_die)


def test_resume_is_bit_identical(tmp_path, tiny_model_dir, monkeypatch):
    full = train(_cfg(tmp_path, tiny_model_dir, "full"))
    assert full.steps == 9  # 8 pairs / batch 3 = 3 micro-batches per epoch, 3 epochs
    _interrupt_after(monkeypatch, 4)  # mid-epoch (epoch 1, after its first batch)
    with pytest.raises(Killed):
        train(_cfg(tmp_path, tiny_model_dir, "cut"))
    monkeypatch.undo()
    resumed = train(_cfg(tmp_path, tiny_model_dir, "cut"), resume=True)
    assert resumed.summary["resumed_from"].endswith("step-00000004")
    assert weights_sha(resumed.run_dir) == weights_sha(full.run_dir)
    assert losses(resumed.run_dir) == losses(full.run_dir)  # max abs diff 0.0


def test_a_loss_with_loop_state_resumes_bit_identical(tmp_path, tiny_model_dir, monkeypatch):
    """bco_pair's running reward baseline is loop state: each checkpoint's state.json holds it, and
    a run cut mid-epoch and resumed moves it (and trains) exactly as the uninterrupted one."""
    full = train(_cfg(tmp_path, tiny_model_dir, "full", "loss.name=bco_pair"))
    _interrupt_after(monkeypatch, 4)
    with pytest.raises(Killed):
        train(_cfg(tmp_path, tiny_model_dir, "cut", "loss.name=bco_pair"))
    monkeypatch.undo()
    saved = find_checkpoint(tmp_path / "cut").state["loss_state"]
    assert saved["count"] == 4 and saved["mean"] != 0.0
    resumed = train(_cfg(tmp_path, tiny_model_dir, "cut", "loss.name=bco_pair"), resume=True)
    assert resumed.summary["resumed_from"].endswith("step-00000004")
    assert weights_sha(resumed.run_dir) == weights_sha(full.run_dir)
    assert losses(resumed.run_dir) == losses(full.run_dir)
    assert resumed.summary["loss_state"] == full.summary["loss_state"]


def test_rotation_keeps_the_newest(tmp_path, tiny_model_dir):
    run = train(_cfg(tmp_path, tiny_model_dir)).run_dir
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000007", "step-00000008"]


def test_broken_newest_checkpoint_falls_back_and_is_named(tmp_path, tiny_model_dir, monkeypatch, capsys):
    _interrupt_after(monkeypatch, 5)
    with pytest.raises(Killed):
        train(_cfg(tmp_path, tiny_model_dir))
    monkeypatch.undo()
    run = tmp_path / "run"
    newest = run / "checkpoints" / "step-00000005"
    with open(newest / "optimizer.safetensors", "r+b") as fh:  # truncate one file
        fh.truncate(10)
    (run / "checkpoints" / ".tmp-step-6").mkdir()  # a save killed half-way
    ckpt = find_checkpoint(run)
    out = capsys.readouterr().out
    assert ckpt.path.name == "step-00000004"
    assert "skipping checkpoint" in out and "step-00000005" in out and "sha256" in out
    assert not (run / "checkpoints" / ".tmp-step-6").exists()
    (newest / "manifest.json").unlink()
    assert find_checkpoint(run).path.name == "step-00000004"


def test_missing_component_invalidates_a_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(Killed):
        train(_cfg(tmp_path, tiny_model_dir))
    for name in ("rng.json", "scheduler.json", "state.json"):
        (tmp_path / "run" / "checkpoints" / "step-00000002" / name).rename(tmp_path / name)
        assert find_checkpoint(tmp_path / "run", log=lambda _: None).path.name == "step-00000001"
        (tmp_path / name).rename(tmp_path / "run" / "checkpoints" / "step-00000002" / name)


def test_resume_refuses_changed_settings_or_data(tmp_path, tiny_model_dir, monkeypatch):
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(Killed):
        train(_cfg(tmp_path, tiny_model_dir))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="loss.beta: changed since the checkpoint"):
        train(_cfg(tmp_path, tiny_model_dir, "run", "loss.beta=0.5"), resume=True)  # the DPO recipe's is 0.3
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS[::-1])
    with pytest.raises(ConfigError, match="data.train_sha256"):
        train(_cfg(tmp_path, tiny_model_dir), resume=True)
    assert train(_cfg(tmp_path, tiny_model_dir), resume=True, allow_config_change=True).steps == 9


def test_resume_without_checkpoint_starts_fresh(tmp_path, tiny_model_dir, capsys):
    result = train(_cfg(tmp_path, tiny_model_dir, "fresh", "train.checkpoint_every=0"), resume=True)
    assert result.steps == 9 and "no valid checkpoint" in capsys.readouterr().out


def test_nan_stops_with_exit_3_and_leaves_finite_checkpoints(tmp_path, tiny_model_dir):
    import torch

    with pytest.raises(NumericalError, match="last good checkpoint: .*step-") as info:
        train(_cfg(tmp_path, tiny_model_dir, "run", "train.lr=1e30", "train.max_grad_norm=0", "train.epochs=30"))
    assert info.value.exit_code == 3
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts, "at least one good step was checkpointed"
    for c in ckpts:
        assert all(torch.isfinite(t).all() for t in load_file(c / "trainable.safetensors").values())
    assert not (tmp_path / "run" / "model").exists()
    assert all(v == v for v in losses(tmp_path / "run"))  # logged values are real numbers, never a 0.0 stand-in


def _train_args(tmp_path, model_dir) -> list[str]:
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    return [f"model.name_or_path={model_dir}", f"data.train_path={data}", "data.max_length=64",
            "data.max_prompt_length=32", "train.lr=1e-2", "model.lora_r=4", "train.batch_size=2",
            "train.epochs=8", "train.checkpoint_every=1", "model.lora_dropout=0.1"]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_smoke(tmp_path, tiny_model_dir):
    outcomes = kill_and_resume_trials(tmp_path, "train", _train_args(tmp_path, tiny_model_dir), trials=2)
    assert all(same for same, *_ in outcomes), outcomes


@pytest.mark.slow
def test_sigkill_then_resume_20_trials(tmp_path, tiny_model_dir):
    outcomes = kill_and_resume_trials(tmp_path, "train", _train_args(tmp_path, tiny_model_dir), trials=20, seed=7)
    print("kill/resume outcomes:", outcomes)
    assert sum(same for same, *_ in outcomes) == 20, outcomes


def test_two_identical_runs_are_bit_identical(tmp_path, tiny_model_dir):
    a = train(_cfg(tmp_path, tiny_model_dir, "a", "model.lora_dropout=0.1"))
    b = train(_cfg(tmp_path, tiny_model_dir, "b", "model.lora_dropout=0.1"))
    assert weights_sha(a.run_dir) == weights_sha(b.run_dir)
    assert (a.run_dir / "metrics.jsonl").read_bytes() == (b.run_dir / "metrics.jsonl").read_bytes()
