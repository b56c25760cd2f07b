"""Run-directory integrity (issue 16): one writer per directory, whole-directory overwrite,
resume refusing finished runs, torn metrics lines, malformed manifests, shape-changing resumes."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PAIRS, write_jsonl
from preftune.cli import main
from preftune.utils.rundir import LOCK_NAME, RunLock, read_jsonl_tail_tolerant


def _args(tmp_path, model_dir, run, *extra):
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_jsonl(data, PAIRS)
    return [f"model.name_or_path={model_dir}", f"data.train_path={data}", f"run.output_dir={run}",
            "data.max_length=64", "data.max_prompt_length=32", "train.lr=1e-2", "model.lora_r=4",
            "train.batch_size=2", "train.epochs=2", "train.checkpoint_every=1", *extra]


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _one_line_exit_2(capsys, argv, expected: str, root: Path) -> str:
    before = _digest(root)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert "Traceback" not in err[0]
    assert _digest(root) == before
    return err[0]


@pytest.fixture
def unfinished_run(tmp_path, tiny_model_dir, capsys):
    """A checkpointed run whose process died before its end (no summary.json, no model/)."""
    run = tmp_path / "run"
    assert main(["train", *_args(tmp_path, tiny_model_dir, run)]) == 0
    (run / "summary.json").unlink()
    import shutil

    shutil.rmtree(run / "model")
    capsys.readouterr()
    return run


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "preftune", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


_PAUSED = """
import sys, time
from pathlib import Path
import preftune.training.train
t = sys.modules["preftune.training.train"]
save, go = t.save_checkpoint, Path(sys.argv[1])
def paused(*a, **k):  # hold the run at its first checkpoint until the test says go
    while not go.exists():
        time.sleep(0.05)
    return save(*a, **k)
t.save_checkpoint = paused
from preftune.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def test_a_second_writer_exits_2_with_one_line_and_the_first_finishes_intact(tmp_path, tiny_model_dir):
    run, go = tmp_path / "run", tmp_path / "go"
    args = _args(tmp_path, tiny_model_dir, run, "train.epochs=6")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-c", _PAUSED, str(go), "train", *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    start = time.monotonic()
    while not (run / "metrics.jsonl").exists():  # the first writer holds the directory
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() - start < 120
        time.sleep(0.05)
    rivals = [_cli("train", *args, "run.overwrite=true"), _cli("train", *args), _cli("resume", str(run))]
    said = []
    for rival in rivals:
        _, err = rival.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert rival.returncode == 2 and len(lines) == 1, lines
        said.append(lines[0])
    go.touch()
    assert said[0].startswith(f"{run}: run.output_dir: in use by pid {first.pid} on "), said
    assert said[1].startswith(f"{run}: run.output_dir: already exists"), said
    assert said[2].startswith(f"{run}: run.output_dir: in use by pid {first.pid} on "), said
    assert first.wait(timeout=300) == 0, first.stderr.read()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert json.loads((run / "summary.json").read_text())["steps"] == 24
    assert len(list((run / "checkpoints").glob("step-*"))) == 2
    assert (run / "model" / "adapter_model.safetensors").is_file() and not (run / LOCK_NAME).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []


def test_a_held_lock_names_its_holder(tmp_path):
    run = tmp_path / "run"
    held = RunLock(run, overwrite=False, resume=False)
    try:
        with pytest.raises(Exception, match=rf"in use by pid {os.getpid()} on "):
            RunLock(run, overwrite=True, resume=False)
    finally:
        held.release()
    assert not (run / LOCK_NAME).exists()


def test_a_stale_lock_file_from_a_killed_run_does_not_block(unfinished_run, capsys):
    (unfinished_run / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then"}))
    assert main(["resume", str(unfinished_run)]) == 0
    assert not (unfinished_run / LOCK_NAME).exists()


def test_overwrite_replaces_the_whole_directory(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", *_args(tmp_path, tiny_model_dir, run)]) == 0
    (run / "eval.json").write_text("{}")
    (run / "report.html").write_text("old")
    assert (run / "checkpoints").is_dir()
    assert main(["train", *_args(tmp_path, tiny_model_dir, run, "train.checkpoint_every=0", "run.overwrite=true")]) == 0
    names = {p.name for p in run.iterdir()}
    assert not names & {"eval.json", "report.html", "checkpoints", LOCK_NAME}, names
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []


def test_overwrite_that_fails_before_training_keeps_the_old_run(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", *_args(tmp_path, tiny_model_dir, run)]) == 0
    capsys.readouterr()
    before = _digest(run)
    bad_ref = f"model.reference_name_or_path={tmp_path / 'no-such-model'}"
    assert main(["train", *_args(tmp_path, tiny_model_dir, run, "run.overwrite=true", "model.lora=false", bad_ref)]) == 2
    assert _digest(run) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []


def test_resume_refuses_a_finished_run(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", *_args(tmp_path, tiny_model_dir, run, "train.checkpoint_every=0")]) == 0
    capsys.readouterr()
    line = _one_line_exit_2(capsys, ["resume", str(run)], f"{run}: resume: this run finished at step 8", run)
    assert "run.overwrite=true" in line


def test_resume_refuses_changed_data(unfinished_run, tmp_path, capsys):
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:6])
    _one_line_exit_2(capsys, ["resume", str(unfinished_run)], ": data.train_sha256: changed since the checkpoint",
                     unfinished_run)


def test_resume_drops_a_torn_last_metrics_line(unfinished_run, capsys):
    metrics = unfinished_run / "metrics.jsonl"
    with open(metrics, "a") as fh:
        fh.write('{"step": 9, "loss": 0.6')  # killed mid-write
    assert main(["resume", str(unfinished_run)]) == 0
    out = capsys.readouterr().out
    assert "dropping a torn last line" in out
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))


def test_a_malformed_middle_metrics_line_is_one_line(unfinished_run, capsys):
    metrics = unfinished_run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2][:10]
    metrics.write_text("\n".join(lines) + "\n")
    _one_line_exit_2(capsys, ["resume", str(unfinished_run)], f"{metrics}:3: json: malformed line", unfinished_run)


def test_torn_tail_reader(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a"')
    warned = []
    assert read_jsonl_tail_tolerant(path, warn=warned.append) == [{"a": 1}, {"a": 2}]
    assert len(warned) == 1 and ":3: dropping a torn last line" in warned[0]


MANIFESTS = {
    "not-json": "{oops",
    "a-list": "[1, 2]",
    "size-as-string": None,  # filled from the real manifest
    "missing-sha": None,
    "entry-is-number": None,
    "path-escape-keys": None,
}


def _mangle(manifest: dict, case: str) -> str:
    first = next(iter(manifest))
    if case == "size-as-string":
        manifest[first]["size"] = str(manifest[first]["size"])
    elif case == "missing-sha":
        del manifest[first]["sha256"]
    elif case == "entry-is-number":
        manifest[first] = 7
    elif case == "path-escape-keys":
        manifest = {f"../../{k}": v for k, v in manifest.items()}
    return json.dumps(manifest)


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_malformed_manifests_make_a_checkpoint_invalid_never_a_traceback(unfinished_run, case, capsys):
    for ckpt in (unfinished_run / "checkpoints").glob("step-*"):
        text = MANIFESTS[case] or _mangle(json.loads((ckpt / "manifest.json").read_text()), case)
        (ckpt / "manifest.json").write_text(text)
    newest = sorted((unfinished_run / "checkpoints").glob("step-*"))[-1]
    before = _digest(unfinished_run)
    assert main(["resume", str(unfinished_run)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{newest}: checkpoint: no checkpoint"), err
    assert "skipping checkpoint" in captured.out and "Traceback" not in captured.err
    assert _digest(unfinished_run) == before


@pytest.mark.parametrize("change", ["model.lora_r=8", "model.lora_target_modules=[q_proj]"])
def test_allow_config_change_that_changes_shapes_is_one_line(unfinished_run, capsys, change):
    line = _one_line_exit_2(capsys, ["resume", str(unfinished_run), "--allow-config-change", change],
                            ": checkpoint: tensor ", unfinished_run)
    assert "start a new run" in line
