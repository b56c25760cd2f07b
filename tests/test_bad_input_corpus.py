"""The bad-input corpus (RELIABILITY.md A1/A2, issue 7): every case exits 2 with exactly one
line on stderr naming the file (or config source), the line/record or key, and the field, and
leaves the output directory and the input directory byte-identical."""

import hashlib
import json
import re
from pathlib import Path

import pytest

from conftest import PAIRS
from preftune.cli import main

GOOD = json.dumps(PAIRS[0])
MSG = [{"role": "user", "content": "hi"}]
A, B = [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]


def _j(obj) -> str:
    return json.dumps(obj)


# id -> (files to write under in/, extra CLI args, expected "where: field" prefix, with {in} = input dir)
DATA_CASES = {
    "missing-field": ({"d.jsonl": [GOOD, '{"prompt": "p", "chosen": " a"}']}, [], "{in}/d.jsonl:2: rejected: missing"),
    "null-field": ({"d.jsonl": [GOOD, '{"prompt": "p", "chosen": " a", "rejected": null}']}, [],
                   "{in}/d.jsonl:2: rejected: is null"),
    "int-field": ({"d.jsonl": ['{"prompt": "p", "chosen": 5, "rejected": " b"}']}, [], "{in}/d.jsonl:1: chosen:"),
    "empty-chosen": ({"d.jsonl": [GOOD, GOOD, '{"prompt": "p", "chosen": "", "rejected": " b"}']}, [],
                     "{in}/d.jsonl:3: chosen: is empty"),
    "empty-prompt": ({"d.jsonl": ['{"prompt": "", "chosen": " a", "rejected": " b"}']}, [], "{in}/d.jsonl:1: prompt:"),
    "truncated-json": ({"d.jsonl": [GOOD, GOOD, GOOD, GOOD, '{"prompt": "p", "chos']}, [], "{in}/d.jsonl:5: json:"),
    "trailing-garbage": ({"d.jsonl": [GOOD] * 8 + ["not json at all"]}, [], "{in}/d.jsonl:9: json:"),
    "bad-utf8": ({"d.jsonl": [GOOD, b'{"prompt": "\xff\xfe", "chosen": " a", "rejected": " b"}']}, [],
                 "{in}/d.jsonl:2: encoding:"),
    "empty-file": ({"d.jsonl": []}, [], "{in}/d.jsonl:1: file: no records"),
    "blank-lines-only": ({"d.jsonl": ["", "  ", ""]}, [], "{in}/d.jsonl:1: file: no records"),
    "chosen-equals-rejected": ({"d.jsonl": [GOOD, '{"prompt": "p", "chosen": " x", "rejected": " x"}']}, [],
                               "{in}/d.jsonl:2: rejected: identical"),
    "mixed-formats": ({"d.jsonl": [GOOD, _j({"prompt": MSG, "chosen": A, "rejected": B})]}, [],
                      "{in}/d.jsonl:2: prompt: format differs"),
    "speaker-text-messages": ({"d.jsonl": [_j({"prompt": [{"speaker": "user", "text": "x"}], "chosen": A,
                                                "rejected": B})]}, [], "{in}/d.jsonl:1: prompt[0].role: missing"),
    "completion-not-assistant": ({"d.jsonl": [_j({"prompt": MSG, "chosen": MSG, "rejected": B})]}, [],
                                 "{in}/d.jsonl:1: chosen[0].role:"),
    "typo-column": ({"d.jsonl": ['{"prompt": "p", "chosen": " a", "rejeted": " b"}']}, [],
                    "{in}/d.jsonl:1: rejected: missing"),
    "not-an-object": ({"d.jsonl": ["[1, 2, 3]"]}, [], "{in}/d.jsonl:1: record:"),
    "no-common-prefix": ({"d.jsonl": ['{"chosen": "abc", "rejected": "xyz"}']}, [], "{in}/d.jsonl:1: prompt:"),
    "unpaired-for-paired-loss": ({"d.jsonl": ['{"prompt": "p", "completion": " a", "label": true}']}, [],
                                 "{in}/d.jsonl:1: format: this loss needs paired"),
    "paired-for-kto": ({"d.jsonl": [GOOD]}, ["loss.name=kto"], "{in}/d.jsonl:1: format: this loss needs unpaired"),
    "bad-label": ({"d.jsonl": ['{"prompt": "p", "completion": " a", "label": "yes please"}']}, ["loss.name=kto"],
                  "{in}/d.jsonl:1: label:"),
    "identical-after-truncation": ({"d.jsonl": ['{"prompt": "p", "chosen": " the same long start a", '
                                                '"rejected": " the same long start b"}']},
                                   ["data.max_length=3", "data.max_prompt_length=1"],
                                   "{in}/d.jsonl:1: rejected: chosen and rejected are identical after truncation"),
    "nothing-left-after-truncation": ({"d.jsonl": ['{"prompt": "p", "chosen": " the same long start a", '
                                                   '"rejected": " the same long start b"}']},
                                      ["data.max_length=3", "data.max_prompt_length=1", "data.drop_overlong=true"],
                                      "{in}/d.jsonl:1: file: no usable pairs left"),
    "csv-missing-column": ({"d.csv": ["prompt,chosen", "p, a"]}, [], "{in}/d.csv:2: rejected: missing"),
    "json-not-a-list": ({"d.json": ['{"prompt": "p"}']}, [], "{in}/d.json:1: json: expected a list"),
    "unknown-extension": ({"d.txt": ["hello"]}, [], "{in}/d.txt:0: file: unknown extension"),
    "hh-without-assistant": ({"d.jsonl": ['{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", '
                                          '"rejected": "\\n\\nHuman: hi\\n\\nAssistant: b"}',
                                          '{"chosen": "\\n\\nHuman: hi there", "rejected": "\\n\\nHuman: bye"}']}, [],
                             "{in}/d.jsonl:2: chosen: no shared"),
    "empty-slice": ({"d.jsonl": [GOOD, GOOD]}, ["data.train_path={in}/d.jsonl[5:]"],
                    "{in}/d.jsonl:1: file: no records in the slice"),
}

CONFIG_CASES = {
    "unknown-key": ("train:\n  lrr: 0.1\n", [], "{cfg}: train.lrr: unknown key (did you mean 'lr'?)"),
    "unknown-section": ("trian:\n  lr: 0.1\n", [], "{cfg}: trian: unknown section (did you mean 'train'?)"),
    "wrong-type": ("train:\n  batch_size: four\n", [], "{cfg}: train.batch_size: expected int, got str"),
    "beta-negative": ("loss:\n  beta: -0.1\n", [], "{cfg}: loss.beta: must be > 0"),
    "lr-nan": ("train:\n  lr: .nan\n", [], "{cfg}: train.lr: must be a number in (0, 3.4e+38]"),
    "label-smoothing-half": ("loss:\n  name: cdpo\n  label_smoothing: 0.5\n", [],
                             "{cfg}: loss.label_smoothing: must be in [0, 0.5)"),
    "prompt-longer-than-max": ("data:\n  max_length: 64\n  max_prompt_length: 80\n", [],
                               "{cfg}: data.max_prompt_length: must be in [1, data.max_length=64)"),
    "unknown-loss": ("loss:\n  name: dpoo\n", [], "{cfg}: loss.name: unknown loss 'dpoo'"),
    "unpaired-in-mixture": ("loss:\n  mix: [[sigmoid, 1.0], [kto, 1.0]]\n", [], "{cfg}: loss.mix[1]:"),
    "invalid-yaml": ("train: [unclosed\n", [], "{cfg}:2: <yaml>: invalid YAML"),
    "cli-override-typo": ("", ["train.bach_size=2"], "command line: train.bach_size: unknown key"),
}


def _write(root: Path, files: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
        (root / name).write_bytes(data)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _assert_one_line_exit_2(capsys, argv, expected_prefix, watched: list[Path]):
    before = [_tree_digest(p) if p.exists() else None for p in watched]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(expected_prefix), (err[0], expected_prefix)
    assert re.match(r"^[^\n]+?(:\d+)?: [\w.\[\]<>]+: .+$", err[0]) or err[0].startswith("command line: ")
    assert [_tree_digest(p) if p.exists() else None for p in watched] == before


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data(case, tmp_path, capsys, tiny_model_dir):
    files, extra, expected = DATA_CASES[case]
    inp, out = tmp_path / "in", tmp_path / "out"
    _write(inp, files)
    (name,) = files
    args = [a.format(**{"in": inp}) for a in extra]
    if not any(a.startswith("data.train_path=") for a in args):
        args.append(f"data.train_path={inp / name}")
    argv = ["train", *args, f"run.output_dir={out / 'run'}", f"model.name_or_path={tiny_model_dir}"]
    _assert_one_line_exit_2(capsys, argv, expected.format(**{"in": inp}), [inp, out])
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config(case, tmp_path, capsys):
    text, overrides, expected = CONFIG_CASES[case]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    _assert_one_line_exit_2(capsys, ["train", "-c", str(cfg), *overrides, f"run.output_dir={tmp_path / 'run'}"],
                            expected.format(cfg=cfg), [tmp_path / "run"])
    assert not (tmp_path / "run").exists()


def test_missing_data_file(tmp_path, capsys):
    _assert_one_line_exit_2(capsys, ["train", f"data.train_path={tmp_path / 'nope.jsonl'}",
                                     f"run.output_dir={tmp_path / 'run'}"],
                            f"{tmp_path / 'nope.jsonl'}:0: file: no such file", [tmp_path / "run"])


def test_missing_config_file(tmp_path, capsys):
    _assert_one_line_exit_2(capsys, ["train", "-c", str(tmp_path / "none.yaml")],
                            f"{tmp_path / 'none.yaml'}: <file>: no such config file", [tmp_path])


@pytest.fixture
def good_data(tmp_path):
    _write(tmp_path / "in", {"d.jsonl": [json.dumps(p) for p in PAIRS]})
    return tmp_path / "in" / "d.jsonl"


def test_missing_model(tmp_path, capsys, good_data):
    _assert_one_line_exit_2(capsys, ["train", f"data.train_path={good_data}", f"run.output_dir={tmp_path / 'run'}",
                                     f"model.name_or_path={tmp_path / 'no-model'}"],
                            f"{tmp_path / 'no-model'}: model.name_or_path: no such directory", [tmp_path / "run"])


def test_pickle_only_weights(tmp_path, capsys, good_data, tiny_model_dir):
    import shutil

    import torch
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    _assert_one_line_exit_2(capsys, ["train", f"data.train_path={good_data}", f"run.output_dir={tmp_path / 'run'}",
                                     f"model.name_or_path={model}"],
                            f"{model}: model.name_or_path: only pickle (.bin) weights", [tmp_path / "run", model])


def test_remote_code_model(tmp_path, capsys, good_data, tiny_model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    _assert_one_line_exit_2(capsys, ["train", f"data.train_path={good_data}", f"run.output_dir={tmp_path / 'run'}",
                                     f"model.name_or_path={model}"],
                            f"{model}: model.name_or_path: config.json asks to run code", [tmp_path / "run", model])


def test_existing_output_dir(tmp_path, capsys, good_data):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("keep")
    _assert_one_line_exit_2(capsys, ["train", f"data.train_path={good_data}", f"run.output_dir={tmp_path / 'run'}"],
                            f"{tmp_path / 'run'}: run.output_dir: already exists", [tmp_path / "run"])


@pytest.fixture
def checkpointed_run(tmp_path, good_data, tiny_model_dir):
    run = tmp_path / "run"
    assert main(["train", f"data.train_path={good_data}", f"run.output_dir={run}", f"model.name_or_path={tiny_model_dir}",
                 "train.checkpoint_every=1", "train.batch_size=2", "train.epochs=2", "model.lora_r=4"]) == 0
    (run / "summary.json").unlink()  # as if killed before the end: a finished run is not resumed
    return run


def test_resume_with_every_checkpoint_corrupt(checkpointed_run, capsys):
    capsys.readouterr()
    for ckpt in (checkpointed_run / "checkpoints").glob("step-*"):
        (ckpt / "trainable.safetensors").write_bytes(b"broken")
    newest = sorted((checkpointed_run / "checkpoints").glob("step-*"))[-1]
    _assert_one_line_exit_2(capsys, ["resume", str(checkpointed_run)], f"{newest}: checkpoint: no checkpoint",
                            [checkpointed_run])


def test_resume_with_changed_beta(checkpointed_run, capsys):
    capsys.readouterr()
    _assert_one_line_exit_2(capsys, ["resume", str(checkpointed_run), "loss.beta=0.5"], str(checkpointed_run),
                            [checkpointed_run])


@pytest.mark.parametrize("edit", ["optimizer-key", "scheduler-shape", "rng-shape"])
def test_resume_of_an_edited_and_rehashed_checkpoint(edit, checkpointed_run, capsys):
    """The manifest's sha256s prove a file is the one written, not that it fits: a checkpoint edited
    and re-hashed (a renamed optimizer key) was an internal error, exit 1."""
    import hashlib
    import json as _json

    from safetensors.torch import load_file, save_file

    newest = sorted((checkpointed_run / "checkpoints").glob("step-*"))[-1]
    if edit == "optimizer-key":
        tensors = load_file(newest / "optimizer.safetensors")
        key = sorted(tensors)[0]
        tensors["bogus"] = tensors.pop(key)
        save_file(tensors, newest / "optimizer.safetensors")
        name = "optimizer.safetensors"
    elif edit == "scheduler-shape":
        (newest / "scheduler.json").write_text("[1, 2]")
        name = "scheduler.json"
    else:
        (newest / "rng.json").write_text('{"ranks": []}')
        name = "rng.json"
    manifest = _json.loads((newest / "manifest.json").read_text())
    data = (newest / name).read_bytes()
    manifest[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / "manifest.json").write_text(_json.dumps(manifest))
    rc = main(["resume", str(checkpointed_run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{newest / name}: checkpoint: does not fit" in err[0], err
