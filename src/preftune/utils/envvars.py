"""The environment variables preftune reads: one table, one validating reader (layer 0).

Each variable is declared once here (name, kind, range, help); every read goes through `env()`,
and the CLI checks every declared variable that is set before it does anything else, so a bad
value is one line naming the variable (exit 2), not a value silently ignored
(`PREFTUNE_MAX_FILE_BYTES=1e9` was), a failure in every read, or a cache written into the working
directory (`PREFTUNE_CACHE=`). Secrets are checked without ever being printed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

__all__ = ["EnvVar", "ENV", "env", "check_environment", "has_control_characters"]


@dataclass(frozen=True)
class EnvVar:
    name: str
    kind: str  # "bytes" (a positive integer) | "dir" | "names" (comma-separated) | "choice" | "text" | "secret"
    help: str
    default: object = None
    high: int = 1 << 50
    choices: tuple = ()


ENV = {v.name: v for v in (
    EnvVar("PREFTUNE_MAX_FILE_BYTES", "bytes", "cap on what one input file may hold or expand to", 1 << 30),
    EnvVar("PREFTUNE_CACHE", "dir", "cache root: converted models, reference log-probs, judge replies",
           Path.home() / ".cache" / "preftune"),
    EnvVar("PREFTUNE_FN_MODULES", "names", "installed packages that fn: rewards may import", ()),
    EnvVar("PREFTUNE_JUDGE_MODEL", "text", "the model name sent to a judge:URL without #model", "judge"),
    EnvVar("PREFTUNE_JUDGE_API_KEY", "secret", "the judge's API key (Authorization: Bearer)", None),
    EnvVar("PREFTUNE_SERVE_API_KEY", "secret", "the key `preftune serve` requires (default of --api-key)", None),
    EnvVar("PREFTUNE_MALLOC", "choice", "auto: the preftune command relaunches itself under jemalloc when it is "
           "installed, else release; release: glibc returns freed blocks from 4 MiB up; system: glibc's defaults; "
           "fast: jemalloc keeping freed pages (MALLOC_CONF dirty/muzzy decay -1), else glibc's defaults "
           "(utils/allocator.py)", "auto", choices=("auto", "release", "system", "fast")),
)}


def has_control_characters(text: str) -> bool:
    """A secret or header value with a line break (or any C0 control, DEL) would split an HTTP header
    or a log line: callers refuse it without printing it."""
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def _parse(var: EnvVar, raw: str):
    where = f"${var.name}"
    if var.kind == "bytes":
        text = raw.strip().replace("_", "")
        if not text.isdigit() or not 1 <= int(text) <= var.high:
            raise ConfigError(where, "environment", f"expected a whole number of bytes in [1, {var.high}], got "
                              f"{raw[:40]!r}")
        return int(text)
    if var.kind == "dir":
        if not raw.strip():
            raise ConfigError(where, "environment", "is set but empty; unset it for the default "
                              f"({var.default}) or name a directory")
        return Path(raw).expanduser().resolve()
    if var.kind == "names":
        names = tuple(n.strip() for n in raw.split(",") if n.strip())
        bad = [n for n in names if not n.replace("_", "a").isalnum() or n[0].isdigit()]
        if bad:
            raise ConfigError(where, "environment", f"expected comma-separated module names, got {bad[0][:40]!r}")
        return names
    if var.kind == "choice":
        if raw.strip() not in var.choices:
            raise ConfigError(where, "environment", f"expected one of {', '.join(var.choices)}, got {raw[:40]!r}")
        return raw.strip()
    if has_control_characters(raw.strip()):
        shown = "(the value is not printed)" if var.kind == "secret" else repr(raw[:40])
        raise ConfigError(where, "environment", f"holds a control character (a line break?) {shown}")
    return raw.strip() or var.default


def env(name: str):
    """The validated value of a declared variable, or its default when it is not set."""
    var = ENV[name]
    raw = os.environ.get(name)
    return var.default if raw is None else _parse(var, raw)


def check_environment() -> None:
    """Every declared variable that is set, checked once (the CLI's first step)."""
    for name in ENV:
        env(name)


def cache_root() -> Path:
    """Where preftune keeps what it computes once (reference log-probs, converted models, judge
    replies, staged API inputs): $PREFTUNE_CACHE, validated (set but empty used to mean the working
    directory)."""
    return env("PREFTUNE_CACHE")
