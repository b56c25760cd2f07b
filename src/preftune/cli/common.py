"""What the command handlers share: argument helpers, the config sections a kind of command
reads, printing once under a launcher, serving until Ctrl-C."""

from __future__ import annotations

import argparse
import math
import os
import re

from ..utils.errors import ConfigError
from ..utils.safeio import check_output

__all__ = ["_number", "_output_file", "_config_args", "_overrides", "_say_once", "_floats", "_serve", "_none", "_is_override", "_TRAINING", "_EVERYTHING", "_DATA"]

# the config sections each kind of command reads (their keys are listed from config.py, not here)
_TRAINING = ("model", "data", "loss", "train", "eval", "diagnostics", "run")
_EVERYTHING = (*_TRAINING, "online", "sampling")
_DATA = ("data", "model")


def _number(kind: type, lo: float, hi: float, *, lo_open: bool = False):
    """argparse `type=` of every numeric flag: `kind` (int or float) within [lo, hi] (or (lo, hi]
    with `lo_open`), finite. One path for all of them, so nan, inf, negatives and huge values are
    one line and exit 2 on every verb (they were exit 0, 1 or 3, or unbounded memory). The range is
    kept on the function (`.range`) for --help and tests."""
    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: expected {kind.__name__} in "
                                             f"{'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return value

    parse.range = (kind, lo, hi, lo_open)
    parse.__name__ = f"{kind.__name__} in range"
    return parse


def _output_file(text: str) -> str:
    """argparse `type=` of every flag that names a file to write (safeio.check_output's rule, at
    parse time: a directory there is refused before any model loads, in one line, exit 2)."""
    try:
        check_output(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(f"{text} {err.problem}") from None
    return text


def _config_args(p, config_help_text: str = "YAML config (only the keys that differ from the defaults)",
                 overrides_help: str = "section.key=value, e.g. train.lr=5e-5 data.train_path=x.jsonl"):
    p.add_argument("-c", "--config", help=config_help_text)
    p.add_argument("overrides", nargs="*", help=overrides_help)


def _overrides(p, text: str = "section.key=value"):
    p.add_argument("overrides", nargs="*", help=text)


def _say_once(line: str) -> None:
    """Print on the main process only (under a launcher every rank returns from train)."""
    if os.environ.get("RANK", "0") == "0":
        print(line)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError("command line", flag, f"expected comma-separated numbers, got {text!r}") from None


def _serve(make, host: str, port: int, message: str) -> int:
    """Bind (or say in one line why not: port in use, no such address), announce, serve until Ctrl-C."""
    try:
        server = make()
    except OSError as err:
        raise ConfigError(f"{host}:{port}", "--port", f"cannot listen there ({err.strerror or err})") from None
    print(message.format("{}:{}".format(*server.server_address[:2])) + " (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def _none(_p) -> None:
    pass


def _is_override(word: str) -> bool:
    """`section.key=value`, as opposed to a file name or a stray word."""
    return re.match(r"^[a-z_]+\.[a-z_]+=", word) is not None
