"""envvars.py and cli.common._number: one validation path for every verb's numeric flags and every
PREFTUNE_* variable, generated from their declarations (issue 36). Each bad value is one stderr
line and exit 2 before any work; before, nan/inf/negatives/huge values of sweep, bon, advise,
serve, label and data arithmetic gave exit 0, 1 or 3 or unbounded memory, PREFTUNE_MAX_FILE_BYTES
garbage was ignored and PREFTUNE_CACHE="" wrote into the working directory."""

import argparse

import pytest

from preftune.cli import _parser, main
from preftune.utils.envvars import ENV


def _numeric_flags() -> list[tuple[list[str], str, tuple]]:
    """(verb path, flag, declared range) of every numeric option, read from the parser; no option
    may take a bare int or float."""
    found = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif action.type in (int, float):
                raise AssertionError(f"{' '.join(path)} {action.option_strings}: a bare {action.type.__name__}; "
                                     "declare its range with cli.common._number")
            elif hasattr(action.type, "range"):
                found.append((path, action.option_strings[-1], action.type.range))

    walk(_parser(), [])
    return found


FLAGS = _numeric_flags()


def test_the_numeric_flags_are_the_ones_the_issue_named():
    verbs = {" ".join(p) for p, _, _ in FLAGS}
    assert {"serve", "label", "bon", "advise", "data arithmetic", "data build", "train-rm"} <= verbs
    assert len(FLAGS) >= 15


def _bad_values(kind, lo, hi, lo_open):
    out = ["nan", "inf", "-inf", "abc", str(lo - 1) if kind is int else str(lo - 0.5), str(hi * 10 + 1)]
    if kind is int:
        out.append("1.5")
    if lo_open:
        out.append(str(lo))
    return out


@pytest.mark.parametrize("path,flag,declared", FLAGS, ids=[f"{' '.join(p)} {f}" for p, f, _ in FLAGS])
def test_every_numeric_flag_refuses_out_of_range_values_in_one_line(path, flag, declared, capsys):
    for bad in _bad_values(*declared):
        with pytest.raises(SystemExit) as stop:
            main([*path, flag, bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and f"argument {flag}" in err[0], (bad, err)


BAD_ENV = {
    "PREFTUNE_MAX_FILE_BYTES": ["1e9", "-5", "0", "lots", ""],
    "PREFTUNE_CACHE": ["", "   "],
    "PREFTUNE_FN_MODULES": ["os;rm", "1abc"],
    "PREFTUNE_JUDGE_MODEL": ["judge\r\nX: 1"],
    "PREFTUNE_JUDGE_API_KEY": ["sk-123\r\nX-Injected: 1"],  # a trailing line break is stripped, not refused
    "PREFTUNE_SERVE_API_KEY": ["sk-456\nX: 1"],
    "PREFTUNE_MALLOC": ["jemalloc", "", "Release"],
}


def test_every_declared_variable_has_bad_values_here():
    assert set(BAD_ENV) == set(ENV)


@pytest.mark.parametrize("name,value", [(n, v) for n, vs in BAD_ENV.items() for v in vs])
def test_a_bad_environment_variable_is_one_line_before_any_work(name, value, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(name, value)
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "p", "chosen": " a", "rejected": " b"}\n')
    rc = main(["validate-data", str(data)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"${name}: environment: "), err
    assert "sk-" not in captured.err + captured.out  # a key is never printed
    assert not list(tmp_path.glob("*cache*"))


def test_good_values_pass(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PREFTUNE_MAX_FILE_BYTES", "1_000_000")
    monkeypatch.setenv("PREFTUNE_FN_MODULES", "yaml, mypkg")
    from preftune.utils.envvars import env

    assert env("PREFTUNE_MAX_FILE_BYTES") == 1_000_000 and env("PREFTUNE_FN_MODULES") == ("yaml", "mypkg")


@pytest.mark.parametrize("argv", [
    ["train", "train.\x1b[31mlr=1"],                      # an override key
    ["validate-data", "/nonexistent/\x1b]0;pwned\x07.jsonl"],  # a file name
    ["tr\x1b[2Jain"],                                    # a verb (argparse's own error)
])
def test_control_characters_never_reach_the_terminal_raw(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as stop:
        rc = stop.code
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b" in err
