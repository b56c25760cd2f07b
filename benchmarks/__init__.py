"""The benchmarks and experiments behind the numbers in README and docs/, as one package.

Each runs from the repository root as `python -m benchmarks.<name>` (its __main__.py), e.g.
`PYTHONPATH=src python -m benchmarks.quality --help`; shared code is imported as a package
(`from benchmarks.experiments import hh_cli`, `from . import quality_outputs`), never through
sys.path. A benchmark whose workers run in fresh processes starts them the same way
(module_command, importable).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_command(module: str, *args: str) -> list[str]:
    """`python -m MODULE ARGS` with this interpreter (a worker is the benchmark's own module)."""
    return [sys.executable, "-m", module, *args]


def importable(env: dict[str, str]) -> dict[str, str]:
    """`env` with the repository root first on PYTHONPATH: a worker finds this checkout's
    `benchmarks` whatever its working directory (the rest of the path is kept as given)."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])}
