"""The one output rule (safeio.check_output / atomic_path, cli.common._output_file): a flag that
names a file to write never deletes or replaces a directory. Before it, `--out DIR` on any verb
below removed DIR recursively and wrote the file in its place, exit 0 (`preftune eval --run
runs/mine ... --out runs/mine` deleted the trained run).

Each case is a complete, valid invocation that would run to its write; only the output names an
existing directory holding a file. The parser's own list of output flags must equal the cases, so
a new output flag without a case fails here."""

import argparse
import hashlib
from pathlib import Path

import pytest

from conftest import PAIRS, one_step_run, write_jsonl
from preftune.cli import _parser, main
from preftune.cli.common import _output_file
from preftune.utils.errors import ConfigError
from preftune.utils.safeio import atomic_path, atomic_write

FN = "fn:conftest:length_reward"
SAMPLING = ["online.max_new_tokens=2", "online.samples_per_prompt=2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("outputs")
    run, pairs = one_step_run(root, tiny_model_dir)
    items = write_jsonl(root / "items.jsonl", [{"id": "p1", "prompt": "q", "response_a": "a", "response_b": "b"}])
    judgments = write_jsonl(root / "j.jsonl", [{"annotator": x, "pair_id": "p1", "preferred": "a", "left": "a",
                                                "calibration": False} for x in ("x", "y")])
    return {"model": f"model.name_or_path={tiny_model_dir}", "pairs": str(pairs), "run": str(run),
            "prompts": str(write_jsonl(root / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS[:2]])),
            "completions": str(write_jsonl(root / "c.jsonl", [{"prompt": "p", "completion": "abc"}])),
            "sft": str(write_jsonl(root / "sft.jsonl", [{"prompt": "p", "response": "a human answer"}])),
            "items": str(items), "judgments": str(judgments)}


CASES = {
    ("eval", "--out"): lambda f, d: ["eval", "--data", f["pairs"], f["model"], "--out", d],
    ("eval", "--per-pair"): lambda f, d: ["eval", "--data", f["pairs"], f["model"], "--per-pair", d],
    ("report", "--out"): lambda f, d: ["report", f["run"], "--out", d],
    ("data balance-length", "--out"): lambda f, d: ["data", "balance-length", f["pairs"], "--out", d],
    ("data build", "--out"): lambda f, d: ["data", "build", f["judgments"], "--pairs", f["items"], "--out", d],
    ("data sft-pairs", "--out"): lambda f, d: ["data", "sft-pairs", f["sft"], "--out", d, f["model"], *SAMPLING],
    ("score", "--out"): lambda f, d: ["score", f["completions"], "--reward", FN, "--out", d],
    ("synth", "--out"): lambda f, d: ["synth", f["prompts"], "--reward", FN, "--out", d, f["model"], *SAMPLING],
    ("bon", "--out"): lambda f, d: ["bon", f["prompts"], "--reward", FN, "--out", d, f["model"], *SAMPLING],
    ("bon", "--pairs"): lambda f, d: ["bon", f["prompts"], "--reward", FN, "--pairs", d, f["model"], *SAMPLING],
    ("bon", "--eval-out"): lambda f, d: ["bon", f["prompts"], "--reward", FN, "--eval", "1,2", "--eval-out", d,
                                         f["model"], *SAMPLING],
    # export writes a directory: --overwrite replaces an earlier export, not any directory
    ("export", "--out --overwrite"): lambda f, d: ["export", f["run"], "--out", d, "--overwrite"],
    # label serves until Ctrl-C, so its case is the parser's refusal alone (test below)
    ("label", "--judgments"): None,
}


def _exit_code(argv: list[str]) -> int:
    """main's return code, or the parser's exit code for a flag it refused."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def _user_dir(tmp_path: Path) -> tuple[Path, dict]:
    d = tmp_path / "mine"
    (d / "model").mkdir(parents=True)
    (d / "model" / "weights.bin").write_bytes(b"precious" * 1000)
    (d / "notes.txt").write_text("a user's run\n")
    return d, _tree(d)


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


def _output_flags() -> set[tuple[str, str]]:
    """(verb path, flag) of every option whose type is the output-file rule, read from the parser."""
    found = set()

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}".strip())
            elif action.type is _output_file:
                found.add((path, action.option_strings[-1]))

    walk(_parser(), "")
    return found


def test_every_output_flag_has_a_case():
    declared = {k for k, v in CASES.items() if not k[1].endswith("--overwrite")}
    assert _output_flags() == declared


@pytest.mark.parametrize("case", [k for k, v in CASES.items() if v is not None], ids=" ".join)
def test_an_output_that_names_a_directory_is_refused_and_the_directory_kept(case, inputs, tmp_path, capsys):
    d, before = _user_dir(tmp_path)
    rc = _exit_code(CASES[case](inputs, str(d)))
    err = capsys.readouterr().err.strip().splitlines()
    assert _tree(d) == before  # nothing deleted, replaced or added
    assert rc == 2 and len(err) == 1 and str(d) in err[0], (rc, err)
    assert not list(tmp_path.glob(".tmp-*"))


def test_label_refuses_a_directory_for_its_judgments_before_serving(tmp_path, capsys, inputs):
    d, before = _user_dir(tmp_path)
    rc = _exit_code(["label", inputs["items"], "--judgments", str(d), "--port", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is an existing directory" in err[0]
    assert _tree(d) == before


def test_export_overwrite_replaces_an_earlier_export_only(inputs, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", inputs["run"], "--out", str(out)]) == 0
    (out / "stale.txt").write_text("from the first export")
    assert main(["export", inputs["run"], "--out", str(out), "--overwrite"]) == 0
    assert (out / "README.md").is_file() and not (out / "stale.txt").exists()


def test_atomic_path_keeps_directories_and_replaces_links_not_their_targets(tmp_path):
    d, before = _user_dir(tmp_path)
    with pytest.raises(ConfigError, match="is an existing directory"):
        atomic_write(d, "x")
    with pytest.raises(ConfigError, match="not empty"):
        with atomic_path(d, directory=True):
            pass
    assert _tree(d) == before and not list(tmp_path.glob(".tmp-*"))
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    atomic_write(link, "new")
    assert target.read_text() == "keep me" and not link.is_symlink() and link.read_text() == "new"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_path(empty, directory=True) as tmp:
        (tmp / "f").write_text("1")
    assert (empty / "f").read_text() == "1"


def test_written_files_take_the_umask_not_a_private_temp_file_s_mode(tmp_path):
    """safetensors writes through a 0600 temp file: a run's adapter was readable by its owner only."""
    import os

    import torch
    from safetensors.torch import save_file

    with atomic_path(tmp_path / "model", directory=True) as tmp:
        save_file({"w": torch.zeros(2)}, tmp / "adapter_model.safetensors")
        (tmp / "private.json").write_text("{}")
        os.chmod(tmp / "private.json", 0o600)
    mask = os.umask(0)
    os.umask(mask)
    for f in ("adapter_model.safetensors", "private.json"):
        assert (tmp_path / "model" / f).stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("err", [OSError(28, "No space left on device"),
                                 RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                              "message: \"No space left on device\" })")])
def test_a_full_disk_names_the_file_and_leaves_no_temp(err, tmp_path):
    """Disk full inside safetensors/torch was exit 1 with no file named."""
    with pytest.raises(ConfigError, match=r"model: output: not written: no space left on the device"):
        with atomic_path(tmp_path / "model", directory=True) as tmp:
            (tmp / "part").write_text("half")
            raise err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_removes_the_temp_file_being_written(tmp_path):
    import subprocess
    import sys

    script = ("import os, signal, time\nfrom preftune.cli import _exit_on_sigterm\nfrom preftune.utils.safeio import atomic_path\n"
              "_exit_on_sigterm()\n"
              f"with atomic_path({str(tmp_path / 'out.json')!r}) as tmp:\n"
              "    tmp.write_text('half')\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(10)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, done.stderr
    assert list(tmp_path.iterdir()) == []
