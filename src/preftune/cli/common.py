"""What the command handlers share: argument helpers, the config sections a kind of command
reads, printing once under a launcher, serving until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from ..errors import ConfigError

__all__ = ["_output_file", "_config_args", "_overrides", "_say_once", "_floats", "_serve", "_none", "_is_override", "_TRAINING", "_EVERYTHING", "_DATA"]

# the config sections each kind of command reads (their keys are listed from config.py, not here)
_TRAINING = ("model", "data", "loss", "train", "eval", "diagnostics", "run")
_EVERYTHING = (*_TRAINING, "online")
_DATA = ("data", "model")


def _output_file(text: str) -> str:
    """argparse `type=` of every flag that names a file to write (safeio.check_output's rule, at
    parse time: a directory there is refused before any model loads, in one line, exit 2)."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing directory; name a file to write (nothing was "
                                         "written or deleted)")
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
