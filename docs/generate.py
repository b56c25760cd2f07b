"""Write docs/reference/*.md from the code's own registries and parser, so the reference cannot
drift: every config key (type, default, help), every verb and flag, every loss, data format,
reward kind, health check and Hugging Face alias, and
the method table (every loss with its paper and how it is tested). `make docs` runs it before `mkdocs build
--strict`; tests/test_docs.py fails when the committed pages differ from what this writes.

    python docs/generate.py          # rewrite the pages
    python docs/generate.py --check  # exit 1 if a page is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "reference"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _prose(text) -> str:
    """A cell of help text. Outside `code`, "][" is escaped: Markdown would read `name[:config][:split]`
    as a reference link, which mkdocs-autorefs (the API page's cross-references) reports as a
    missing target."""
    parts = _cell(text).split("`")
    return "`".join(p.replace("][", "]\\[") if i % 2 == 0 else p for i, p in enumerate(parts))


def config_page() -> str:
    from preftune.config import Config

    lines = ["# Configuration reference", "",
             "Generated from `preftune.config` (`python docs/generate.py`). Every key is set in a YAML file",
             "(`-c FILE`, only the keys that differ) or on the command line as `section.key=value`.", ""]
    for section in dataclasses.fields(Config):
        lines += [f"## `{section.name}`", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        for f in dataclasses.fields(section.default_factory()):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            lines.append(f"| `{section.name}.{f.name}` | {_cell(kind)} | `{_cell(repr(default))}` | "
                         f"{_prose(f.metadata.get('help', ''))} |")
        lines.append("")
    return "\n".join(lines)


def _walk(parser, path):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, [*path, name])
            return
    yield path, parser


def cli_page() -> str:
    from preftune.cli import COMMANDS, _parser

    helps = {c.name: c.help for c in COMMANDS} | {f"{c.name} {s.name}": s.help for c in COMMANDS for s in c.sub}
    lines = ["# Command-line reference", "", "Generated from the parser (`python docs/generate.py`); "
             "`preftune VERB --help` prints the same, with the settings each verb reads.", ""]
    for path, parser in _walk(_parser(), []):
        if not path:
            continue
        verb = " ".join(path)
        lines += [f"## `preftune {verb}`", "", _prose(helps.get(verb, "")), "", "| argument | what it takes |", "|---|---|"]
        for action in parser._actions:
            if action.dest == "help":
                continue
            name = ", ".join(action.option_strings) or action.dest
            what = action.help or ""
            if action.choices and not isinstance(action, argparse._SubParsersAction):
                what += f" (one of: {', '.join(map(str, action.choices))})"
            rng = getattr(action.type, "range", None)
            if rng:
                kind, lo, hi, lo_open = rng
                what += f" ({kind.__name__} in {'(' if lo_open else '['}{lo:g}, {hi:g}])"
            lines.append(f"| `{_cell(name)}` | {_prose(what)} |")
        lines.append("")
    return "\n".join(lines)


def registries_page() -> str:
    from preftune.config import HF_ALIASES
    from preftune.core.diagnostics import CHECKS
    from preftune.core.losses import ALIASES, KINDS, LOSSES
    from preftune.data.sources import FORMATS, UNPAIRED_FORMATS
    from preftune.models.rewards import REWARD_KINDS
    from preftune.utils.envvars import ENV

    lines = ["# Registries", "", "Every closed list, generated from the registry that owns it "
             "(`python docs/generate.py`).", "", "## Losses (`loss.name`)", "", "| name | kind | what it is |",
             "|---|---|---|"]
    lines += [f"| `{name}` | {spec.kind.name} | {_prose(spec.summary)} |" for name, spec in sorted(LOSSES.items())]
    lines += [f"| `{alias}` | | the same as `{name}` |" for alias, name in sorted(ALIASES.items())]
    lines += ["", "## Loss kinds (docs/extending.md)", "", "| kind | trains on | command | progress | layout | model |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {k.name} | {k.data} | `preftune {k.command}` | {k.progress[0]} | {k.layout} | {k.model} |"
              for k in KINDS.values()]
    lines += ["", "## Data formats (`data.format`)", "", ", ".join(f"`{f}`" for f in [*FORMATS, *UNPAIRED_FORMATS]),
              "", "## Reward sources (`online.reward`, `--reward`)", "",
              ", ".join(f"`{k}`" for k in REWARD_KINDS), "", "## Health checks (`diagnostics.stop_on`)", "",
              ", ".join(f"`{c}`" for c in CHECKS), "", "## Environment variables", "",
              "| variable | what it sets |", "|---|---|"]
    lines += [f"| `{v.name}` | {_prose(v.help)} |" for v in ENV.values()]
    lines += ["", "## Hugging Face / TRL names (aliases)", "", "| Hugging Face / TRL | preftune |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in sorted(HF_ALIASES.items())]
    return "\n".join(lines) + "\n"


def test_kinds(root: Path | None = None) -> dict[str, str]:
    """How each registered loss is tested, read from the tests themselves (no import of torch or
    TRL): `TRL oracle` where a module-level `ORACLE = {name: what is compared}` literal in
    tests/oracle/*.py names it, `hand` where tests/core/losses/ names the loss ("name") or its
    function. A loss with neither gets an empty cell, which tests/test_docs.py refuses."""
    import ast

    from preftune.core.losses import LOSSES

    tests = (root or REFERENCE.parents[1]) / "tests"
    oracle: dict[str, str] = {}
    for path in sorted((tests / "oracle").glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "ORACLE" for t in node.targets):
                oracle.update(ast.literal_eval(node.value))
    hand = "\n".join(p.read_text() for p in sorted((tests / "core" / "losses").glob("test_*.py")))
    kinds = {}
    for name, spec in LOSSES.items():
        function = spec.impl.rpartition(":")[2] if isinstance(spec.impl, str) else spec.impl.__name__
        by_hand = f'"{name}"' in hand or f"{function}(" in hand
        parts = [f"TRL oracle ({oracle[name]})" if oracle.get(name, "loss") != "loss" else "TRL oracle"] \
            if name in oracle else []
        kinds[name] = " + ".join(parts + (["hand"] if by_hand else []))
    return kinds


def methods_page() -> str:
    from preftune.core.losses import LOSSES

    kinds = test_kinds()
    lines = ["# Methods", "", "Every registered loss (`loss.name`), generated from the registry and the tests "
             "(`python docs/generate.py`): its kind, the command that trains it, its paper and when to use it, "
             "and how it is tested: `TRL oracle` compares with TRL 1.16 on identical tensors "
             "(`tests/oracle/`, within 1e-6; in brackets the part compared where the rest differs on purpose), "
             "`hand` with values worked out by hand from the paper's equations (`tests/core/losses/`).", "",
             "| loss | kind | command | paper, when to use | tested |", "|---|---|---|---|---|"]
    lines += [f"| `{name}` | {spec.kind.name} | `preftune {spec.kind.command}` | {_prose(spec.summary)} | "
              f"{kinds[name]} |" for name, spec in LOSSES.items()]
    lines += ["", f"{len(LOSSES)} losses, {sum('oracle' in k for k in kinds.values())} of them checked against TRL."]
    return "\n".join(lines) + "\n"


PAGES = {"config.md": config_page, "cli.md": cli_page, "registries.md": registries_page, "methods.md": methods_page}


def main(argv: list[str]) -> int:
    stale = []
    for name, make in PAGES.items():
        text = make().rstrip() + "\n"
        path = REFERENCE / name
        if "--check" in argv:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            REFERENCE.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)} (run python docs/generate.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
