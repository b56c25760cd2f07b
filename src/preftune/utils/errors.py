"""Errors the user can act on. The CLI turns each into one line on stderr and an exit code.

Exit 2 means bad input (data, config, files); exit 3 means training went numerically wrong.
"""

from __future__ import annotations

__all__ = ["PreftuneError", "DataError", "ConfigError", "NumericalError"]


class PreftuneError(Exception):
    """Base class: `str(err)` is the single line shown to the user."""

    exit_code = 2


class DataError(PreftuneError):
    """A bad record: rendered `path:line: field: problem` (line is 1-based, or the record index)."""

    def __init__(self, path: str, line: int, field: str, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        super().__init__(f"{self.path}:{line}: {field}: {problem}")


class ConfigError(PreftuneError):
    """A bad setting: rendered `source: dotted.key: problem`."""

    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: {key}: {problem}")


class NumericalError(PreftuneError):
    """A non-finite loss, gradient or metric; training stops before the optimizer step."""

    exit_code = 3
