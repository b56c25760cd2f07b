"""`preftune completion bash|zsh` (cli/completion.py): generated from the parser and config.py,
so every verb, sub-verb, flag and setting is in it, and bash completes with it."""

import argparse
import dataclasses
import shutil
import subprocess

import pytest

from preftune.cli import COMMANDS, _parser, main
from preftune.config import Config


def _walk(parser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_every_verb_flag_and_setting_is_in_the_script(shell, capsys):
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    arms = dict(line.strip().split(") echo ", 1) for line in script.splitlines() if line.strip().startswith('"')
                and ") echo " in line)
    words = {key.strip('"'): value.rstrip(";").strip('"').split() for key, value in arms.items()}
    paths = 0
    for path, parser in _walk(_parser()):
        name = " ".join(path)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert set(action.choices) <= set(words[f"{name}/sub"]), name
            for flag in action.option_strings:
                assert flag in words[f"{name}/flags"], (name, flag)
        paths += 1
    assert paths > 30  # every verb and sub-verb was walked
    for command in (c for top in COMMANDS for c in (top, *top.sub)):  # the settings each verb reads
        name = command.name if command in COMMANDS else next(f"{t.name} {command.name}" for t in COMMANDS
                                                             if command in t.sub)
        keys = [f"{s.name}.{f.name}=" for s in dataclasses.fields(Config) if s.name in command.sections
                for f in dataclasses.fields(s.default_factory())]
        if keys and f"{name}/keys" in words:
            assert set(keys) <= set(words[f"{name}/keys"]), name
    assert "data.streaming=" in words["train/keys"] and "completion" in words["/sub"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("line, expected", [
    ("preftune tr", "train train-rm"),
    ("preftune train --c", "--config"),
    ("preftune train -c x.yaml data.stre", "data.streaming="),
    ("preftune data ", "inspect agree build sft-pairs arithmetic balance-length"),
    ("preftune completion ", "bash zsh"),
])
def test_bash_completes_with_it(tmp_path, capsys, line, expected):
    assert main(["completion", "bash"]) == 0
    script = tmp_path / "preftune.bash"
    script.write_text(capsys.readouterr().out)
    out = subprocess.run(["bash", "-c", f'source {script}; COMP_LINE="$1"; COMP_POINT=${{#1}}; _preftune; '
                          'echo "${COMPREPLY[*]}"', "_", line], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected and not out.stderr
