"""benchmarks/ is one package and every benchmark runs one way, `python -m benchmarks.<name>` from
the repository root: no module edits sys.path or loads a sibling by its file path (the two ways
around package imports the scripts used to take), every folder holding Python is a package, and
every entry point (a folder's __main__.py, or a module with a `__main__` guard) answers --help."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# named in docs/ and README: these must stay runnable under these names
DOCUMENTED = {"benchmarks.quality", "benchmarks.quality.peer_trl", "benchmarks.quality.search", "benchmarks.scaling",
              "benchmarks.speed_vs_trl", "benchmarks.fsdp", "benchmarks.qlora", "benchmarks.experiments.frontier",
              "benchmarks.experiments.bon", "benchmarks.experiments.dpo_vs_grpo", "benchmarks.experiments.length_bias",
              "benchmarks.experiments.reward_model", "benchmarks.experiments.sft_dpo"}


def _sources() -> list[Path]:
    return sorted(p for p in BENCHMARKS.rglob("*.py") if "__pycache__" not in p.parts)


def path_hacks(source: str) -> list[str]:
    """What in `source` reaches a module other than by a package import: any use of sys.path
    (insert, append, assignment, even a read) and importlib's spec_from_file_location."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            found.append(f"line {node.lineno}: sys.path")
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
            found.append(f"line {node.lineno}: from sys import path")
        elif isinstance(node, ast.ImportFrom) and any(a.name == "spec_from_file_location" for a in node.names):
            found.append(f"line {node.lineno}: spec_from_file_location")
        elif isinstance(node, (ast.Attribute, ast.Name)) and \
                (getattr(node, "attr", None) or getattr(node, "id", None)) == "spec_from_file_location":
            found.append(f"line {node.lineno}: spec_from_file_location")
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__main__" else parts)


def entry_points() -> list[str]:
    """Every `python -m` name under benchmarks/: packages with a __main__.py, and modules run
    under a `if __name__ == "__main__":` guard."""
    names = set()
    for path in _sources():
        if path.name == "__main__.py" or (path.name != "__init__.py" and 'if __name__ == "__main__":' in path.read_text()):
            names.add(_module_name(path))
    return sorted(names)


def test_the_path_check_sees_each_way_around_a_package_import():
    assert path_hacks("import sys\nsys.path.insert(0, 'x')\n") == ["line 2: sys.path"]
    assert path_hacks("import sys\nsys.path = ['x'] + sys.path\n") == ["line 2: sys.path", "line 2: sys.path"]
    assert path_hacks("from sys import path\npath.append('x')\n") == ["line 1: from sys import path"]
    assert path_hacks("import importlib.util\nimportlib.util.spec_from_file_location('m', 'm.py')\n") == \
        ["line 2: spec_from_file_location"]
    assert path_hacks("from importlib.util import spec_from_file_location as s\ns('m', 'm.py')\n") == \
        ["line 1: spec_from_file_location"]
    assert path_hacks("from . import peer_trl\nfrom benchmarks.experiments import hh_cli\nos.path.join('a')\n") == []


def test_no_benchmark_edits_sys_path_or_loads_a_module_by_its_file():
    found = {str(p.relative_to(ROOT)): hacks for p in _sources() if (hacks := path_hacks(p.read_text()))}
    assert found == {}, "use package imports (from benchmarks.x import y / from . import y) instead"


def test_every_folder_with_python_in_it_is_a_package():
    folders = {p.parent for p in _sources()}
    folders |= {parent for f in folders for parent in f.parents if parent.is_relative_to(BENCHMARKS)}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()) == []


def test_the_documented_benchmarks_are_entry_points_and_no_run_py_is_left():
    assert DOCUMENTED <= set(entry_points()), DOCUMENTED - set(entry_points())
    assert [str(p.relative_to(ROOT)) for p in BENCHMARKS.rglob("run.py")] == []


@pytest.mark.parametrize("module", entry_points())
def test_each_entry_point_answers_help_when_run_as_a_module(module):
    """`python -m MODULE --help` from the repository root, as docs/ tells a reader to run it; the
    interpreter's own path only (no PYTHONPATH but src), so nothing else makes `benchmarks` importable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: "), proc.stdout[:500]
