"""pyproject declares ranges (a user's CUDA torch survives `pip install preftune`); the exact
versions the project tests with live in constraints.txt, which the Makefile passes to pip."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _deps() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {Requirement(r).name.lower(): Requirement(r) for r in data["project"]["dependencies"]}


def _pins() -> dict[str, Version]:
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()]
    return {name.lower(): Version(v) for name, v in (ln.split("==") for ln in lines if ln)}


def test_torch_is_a_range_with_the_security_floor_never_an_exact_pin():
    torch = _deps()["torch"]
    assert not any(s.operator in ("==", "===") for s in torch.specifier), torch
    assert not torch.specifier.contains("2.9.1") and torch.specifier.contains("2.10.0")  # floor 2.10
    assert torch.specifier.contains("2.13.0") and torch.specifier.contains("2.14.1")  # CPU and CUDA builds


def test_no_runtime_dependency_is_pinned_exactly():
    exact = [str(r) for r in _deps().values() if any(s.operator == "==" for s in r.specifier)]
    assert exact == []


def test_the_tested_versions_are_pinned_in_constraints_and_inside_the_ranges():
    deps, pins = _deps(), _pins()
    assert pins["torch"] == Version("2.13.0")
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors"):
        assert deps[name].specifier.contains(pins[name]), (name, pins[name])


def test_the_makefile_installs_with_the_constraints():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install -q -c constraints\.txt torch==2\.13\.0", make)
    assert "-c constraints.txt -e '.[dev]'" in make


def test_every_folder_of_the_package_ships_in_the_wheel():
    """setuptools' find_packages (pyproject: packages.find where=src) skips a folder without
    __init__.py and everything under it: src/preftune/runs/ once had none (.gitignore's `runs/`
    matched it), so a wheel carried no GRPO, SFT, reward-model or online code."""
    from setuptools import find_packages

    src = ROOT / "src"
    folders = {p.parent for p in (src / "preftune").rglob("*.py") if "__pycache__" not in p.parts}
    expected = {".".join(f.relative_to(src).parts) for f in folders}
    assert expected - set(find_packages(where=str(src))) == set()
