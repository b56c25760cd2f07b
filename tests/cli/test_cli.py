"""End-to-end CLI behaviour: bad input is one line on stderr, exit 2, and nothing written."""

import json
import os
import subprocess
import sys

import pytest

from conftest import PAIRS, write_jsonl
from preftune.cli import main
from preftune.utils.errors import ConfigError

GOOD = json.dumps(PAIRS[0])


@pytest.mark.parametrize("lines, line, field", [
    ([GOOD, '{"prompt": "p", "chosen": " a"}'], 2, "rejected"),                  # missing field
    ([GOOD, GOOD, '{"prompt": "p", "chosen": "", "rejected": " b"}'], 3, "chosen"),  # empty completion
    (['{"prompt": "p", "chosen": 7, "rejected": " b"}'], 1, "chosen"),            # non-string
    ([GOOD, '{"prompt": "p", "chosen": " a", "rej'], 2, "json"),                  # bad JSON line
    ([], 1, "file"),                                                              # empty file
])
def test_malformed_data_one_line_exit_2_nothing_written(tmp_path, capsys, tiny_model_dir, lines, line, field):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(x + "\n" for x in lines))
    run_dir = tmp_path / "run"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["train", f"data.train_path={data}", f"run.output_dir={run_dir}",
               f"model.name_or_path={tiny_model_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"{data}:{line}: {field}: "), err
    assert not run_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == before


def test_config_errors_exit_2_with_did_you_mean(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lrr: 0.1\n")
    assert main(["train", "-c", str(cfg)]) == 2
    assert capsys.readouterr().err.strip() == f"{cfg}: train.lrr: unknown key (did you mean 'lr'?)"
    assert main(["train", "loss.beta=-0.1"]) == 2
    assert capsys.readouterr().err.strip() == "command line: loss.beta: must be > 0"


def test_existing_run_dir_is_refused_before_loading(tmp_path, capsys, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    assert main(["train", f"data.train_path={data}", f"run.output_dir={tmp_path / 'run'}"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["keep.txt"]


def test_real_process_exit_code_and_no_traceback(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(GOOD + "\n" + '{"prompt": "p", "chosen": " a"}\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "preftune", "validate-data", str(data)], capture_output=True,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"{data}:2: rejected: missing (the record has: prompt, chosen; map a column with "
                                   "data.column_map='{YOUR_COLUMN: rejected}')")


def test_train_then_eval_through_the_cli(tmp_path, capsys, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    run_dir = tmp_path / "run"
    assert main(["train", f"data.train_path={data}", f"run.output_dir={run_dir}", f"model.name_or_path={tiny_model_dir}",
                 "train.lr=3e-2", "train.epochs=4", "loss.beta=0.5", "model.lora_r=4", f"data.eval_path={data}"]) == 0
    summary = capsys.readouterr().out.split(f"run: {run_dir} (")[1].splitlines()  # the end-of-run summary
    assert len(summary) <= 8
    assert summary[1].startswith("final step: loss ") and ", margin " in summary[1]
    assert summary[2].startswith("held-out: accuracy ") and "(8 pairs)" in summary[2]
    assert summary[3] == "health: no flags" and summary[4] == f"model: {run_dir / 'model'} (LoRA adapter)"
    assert summary[5] == f"next: preftune eval --run {run_dir} --data {data}"
    assert summary[6].strip() == f"preftune export {run_dir} --out {tmp_path / 'run-export'} --merge"
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(run_dir), "--data", str(data), "--out", str(out),
                 "eval.kl_prompts=4", "eval.kl_samples=16", "eval.max_new_tokens=8"]) == 0
    after = json.loads(out.read_text())
    assert after["pairs"] == 8 and after["accuracy/implicit_reward"] >= 0.75
    # a Monte-Carlo KL of a policy this close to its reference can come out below 0; its interval cannot
    lo, hi = after["kl_ci95"]
    assert after["kl_samples"] == 64 and lo < after["kl"] < hi and hi > 0 and after["kl_stderr"] > 0
    assert main(["eval", "--data", str(data), "--out", str(out), f"model.name_or_path={tiny_model_dir}",
                 "eval.kl_prompts=2"]) == 0
    before = json.loads(out.read_text())
    assert before["rewards/margins"] == 0 and before["kl"] == 0  # base model: policy == reference
    # ... so it is not sampled (a toy eval spent minutes sampling a KL of 0), and the table says why
    assert before["kl_samples"] == 0 and "sample_length/policy" not in before
    assert "KL(policy || reference)    0 (policy == reference: 0 by definition, not sampled)" in capsys.readouterr().out


def test_non_finite_training_exits_3_with_one_line(tmp_path, capsys, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    rc = main(["train", f"data.train_path={data}", f"run.output_dir={tmp_path / 'run'}",
               f"model.name_or_path={tiny_model_dir}", "train.lr=1e30", "train.max_grad_norm=0", "train.epochs=20",
               "train.batch_size=2", "train.checkpoint_every=1", "diagnostics.probe_every=0"])
    # no probe sampling: on a loaded machine it takes over 10 s and prints a progress line to stderr
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1
    assert "is not finite" in err[0] and "last good checkpoint: " in err[0] and "step-" in err[0]
    assert not (tmp_path / "run" / "model").exists()


def test_eval_with_a_reward_source_and_several_sets(tmp_path, capsys, tiny_model_dir):
    a = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    b = write_jsonl(tmp_path / "b.jsonl", PAIRS[:4])
    out = tmp_path / "eval.json"
    assert main(["eval", "--data", str(a), str(b), "--reward", "fn:conftest:length_reward", "--out", str(out),
                 f"model.name_or_path={tiny_model_dir}", "eval.kl_prompts=3", "eval.kl_samples=2",
                 "eval.max_new_tokens=6"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {str(a), str(b)}
    r = result[str(a)]
    assert r["pairs"] == 8 and result[str(b)]["pairs"] == 4
    assert r["perplexity/chosen"] > 1
    # base model: policy and reference are the same weights and the same seed -> identical samples
    assert r["sample_length/policy/mean"] == r["sample_length/reference/mean"]
    assert r["reward/policy"] == r["reward/reference"] and r["win_rate"] == 0.5
    assert r["win_rate/comparisons"] == 6 and len(r["per_prompt"]) == 3


def test_overrides_after_several_data_files_are_not_taken_as_files(tmp_path, tiny_model_dir):
    a = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    out = tmp_path / "eval.json"
    assert main(["eval", "--out", str(out), "--data", str(a), f"model.name_or_path={tiny_model_dir}",
                 "eval.kl_prompts=0"]) == 0
    assert json.loads(out.read_text())["pairs"] == 8


def test_eval_reuses_the_reference_cache_written_by_training(tmp_path, capsys, tiny_model_dir, monkeypatch):
    # its own cache: a "before" eval elsewhere in the session may have stored these pairs' logps already
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    run_dir = tmp_path / "run"
    assert main(["train", f"data.train_path={data}", f"run.output_dir={run_dir}", f"model.name_or_path={tiny_model_dir}",
                 "train.lr=3e-2", "train.epochs=2", "model.lora_r=4", "train.reference_cache=true"]) == 0
    assert "computed and cached in" in capsys.readouterr().out
    out = tmp_path / "e.json"
    assert main(["eval", "--run", str(run_dir), "--data", str(data), "--out", str(out), "eval.kl_prompts=0",
                 "train.reference_cache=true"]) == 0
    cached = json.loads(out.read_text())
    assert cached["reference_logps"] == "read from cache"  # the training run's file, not a second pass
    assert main(["eval", "--run", str(run_dir), "--data", str(data), "--out", str(out), "eval.kl_prompts=0",
                 "train.reference_cache=false"]) == 0
    live = json.loads(out.read_text())
    for key in ("rewards/margins", "accuracy/implicit_reward", "rewards/chosen"):
        assert abs(cached[key] - live[key]) < 1e-5, key


def test_a_hub_dataset_while_offline_is_one_line_naming_the_setting(tmp_path, capsys, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    for key, value, other in (("data.train_path", "org/prefs", f"data.eval_path={data}"),
                              ("data.eval_path", "org/prefs:test", f"data.train_path={data}")):
        rc = main(["train", f"{key}={value}", other, f"run.output_dir={tmp_path / 'run'}",
                   f"model.name_or_path={tiny_model_dir}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"{value}:0: {key}: not a local file"), err
        assert "HF_HUB_OFFLINE" in err[0] and not (tmp_path / "run").exists()


def test_version_and_each_commands_settings_in_its_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    from preftune.utils.version import __version__

    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"preftune {__version__}"
    # a setting is listed as "  section.key = default"; other sections may be named in help text
    for argv, has, lacks in ((["train", "--help"], ("train.lr = ", "loss.beta = ", "run.name = "), ("  online.",)),
                             (["validate-data", "--help"], ("data.format = ",), ("train.lr", "model.")),
                             (["data", "inspect", "--help"], ("data.max_length = ", "model.name_or_path = "),
                              ("loss.",))):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "settings (section.key=value):" in out
        assert all(x in out for x in has) and not any(x in out for x in lacks), argv


def test_eval_before_training_leaves_the_reference_logps_for_the_eval_after(tmp_path, tiny_model_dir, monkeypatch):
    import preftune.core.step as step_mod

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))  # "stored", not found from another test

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    held = write_jsonl(tmp_path / "held.jsonl", PAIRS[2:])
    before = tmp_path / "before.json"
    assert main(["eval", "--data", str(held), "--out", str(before), f"model.name_or_path={tiny_model_dir}",
                 "eval.kl_prompts=0"]) == 0
    assert json.loads(before.read_text())["reference_logps"] == "stored in the cache"
    run_dir = tmp_path / "run"
    assert main(["train", f"data.train_path={data}", f"run.output_dir={run_dir}", f"model.name_or_path={tiny_model_dir}",
                 "train.lr=3e-2", "train.epochs=2", "model.lora_r=4"]) == 0
    out = tmp_path / "e.json"
    assert main(["eval", "--run", str(run_dir), "--data", str(held), "--out", str(out), "eval.kl_prompts=0",
                 "eval.reuse_reference_logps=false"]) == 0
    live = json.loads(out.read_text())
    assert "reference_logps" not in live
    # with the before-eval's file, no reference forward runs at all
    calls = []
    original = step_mod.completion_logps
    monkeypatch.setattr(step_mod, "completion_logps", lambda model, batch: calls.append(model) or original(model, batch))
    assert main(["eval", "--run", str(run_dir), "--data", str(held), "--out", str(out), "eval.kl_prompts=0"]) == 0
    cached = json.loads(out.read_text())
    assert cached["reference_logps"] == "read from cache"
    assert cached["pairs"] == live["pairs"] == len(PAIRS) - 2 and len(calls) == 1  # one policy forward per batch
    assert abs(cached["accuracy/implicit_reward"] - live["accuracy/implicit_reward"]) < 1e-9
    for key in ("rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert abs(cached[key] - live[key]) < 1e-5, key
    assert abs(live["rewards/margins"]) > 1e-3  # the run moved: a zero margin would pass any comparison


def test_eval_of_a_run_keeps_its_live_reference_logps_for_the_next_eval(tmp_path, tiny_model_dir, monkeypatch):
    """No "before" eval: the first eval of a run computes the reference live and stores it under the
    reference's weights hash; the next eval on the file (this run's or any other run's from the same
    base) reads it and takes one forward per batch, with the same numbers."""
    import preftune.core.step as step_mod

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    held = write_jsonl(tmp_path / "held.jsonl", PAIRS[2:])
    run_dir, out = tmp_path / "run", tmp_path / "e.json"
    assert main(["train", f"data.train_path={data}", f"run.output_dir={run_dir}", f"model.name_or_path={tiny_model_dir}",
                 "train.lr=3e-2", "train.epochs=2", "model.lora_r=4"]) == 0
    calls = []
    original = step_mod.completion_logps
    monkeypatch.setattr(step_mod, "completion_logps", lambda model, batch: calls.append(model) or original(model, batch))
    assert main(["eval", "--run", str(run_dir), "--data", str(held), "--out", str(out), "eval.kl_prompts=0"]) == 0
    first = json.loads(out.read_text())
    assert first["reference_logps"] == "computed and stored in the cache" and len(calls) == 2  # policy + reference
    calls.clear()
    assert main(["eval", "--run", str(run_dir), "--data", str(held), "--out", str(out), "eval.kl_prompts=0"]) == 0
    second = json.loads(out.read_text())
    assert second["reference_logps"] == "read from cache" and len(calls) == 1
    assert abs(first["rewards/margins"]) > 1e-3  # the run moved: a zero margin would pass any comparison
    for key in ("accuracy/implicit_reward", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert second[key] == first[key], key  # the stored values are the live ones, bit for bit


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["train", "--help"], ["export", "--help"], ["trian"],
                                  ["data", "build", "--help"]])
def test_help_version_and_usage_errors_import_neither_torch_nor_transformers(argv):
    """They took 6.5-8 s (2.5 s here) because the parser's module imported every command's code;
    now the arguments live in cli/args.py and a handler's module loads when its command runs
    (measured after: 0.17 s for each of these on this machine)."""
    probe = ("import sys\nfrom preftune.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate', 'datasets') if m in sys.modules)\n"
             "print('HEAVY', heavy, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in done.stderr, done.stderr[-500:]


def test_hugging_face_names_are_aliases_of_our_keys(tmp_path, tiny_model_dir):
    """`--learning_rate` was refused with no hint: TrainingArguments/TRL names (config.HF_ALIASES)
    now stand for our keys on the command line, and name the key in an override's error."""
    from preftune.cli import _hf_names
    from preftune.config import load_config

    argv = _hf_names(["train", "--learning_rate", "5e-5", "--per_device_train_batch_size=2", "--bf16",
                      "--num_train_epochs", "3", "data.train_path=x.jsonl"])
    assert argv == ["train", "train.lr=5e-5", "train.batch_size=2", "train.autocast_bf16=true", "train.epochs=3",
                    "data.train_path=x.jsonl"]
    cfg = load_config(None, argv[1:])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.autocast_bf16, cfg.train.epochs) == (5e-5, 2, True, 3)
    # a command's own option of the same name is its own, and commands without settings are untouched
    assert _hf_names(["data", "arithmetic", "out", "--seed", "3"]) == ["data", "arithmetic", "out", "--seed", "3"]
    with pytest.raises(ConfigError, match=r"train.learning_rate: unknown key \(did you mean train.lr\? "
                                          r"Hugging Face's learning_rate\)"):
        load_config(None, ["train.learning_rate=5e-5"])
