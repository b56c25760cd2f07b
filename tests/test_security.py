"""RELIABILITY.md D1: no unsafe deserialization or code execution anywhere in the package."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "preftune"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def test_no_unsafe_loads_or_exec_in_the_package():
    problems = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) >= 15
    for path in files:
        tree = ast.parse(path.read_text())
        for node, owner, name in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.name}:{node.lineno}"
            if owner == "pickle" and name in {"load", "loads"}:
                problems.append(f"{where} pickle.{name}")
            if owner == "torch" and name == "load":
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    problems.append(f"{where} torch.load without weights_only=True")
            if owner in {"np", "numpy"} and name == "load" and "allow_pickle" in kw:
                problems.append(f"{where} np.load(allow_pickle=...)")
            if owner == "yaml" and name in {"load", "unsafe_load", "full_load"}:
                problems.append(f"{where} yaml.{name}")
            if name in {"eval", "exec"} and isinstance(node.func, ast.Name):  # not model.eval()
                problems.append(f"{where} {name}()")
            rc = kw.get("trust_remote_code")
            if isinstance(rc, ast.Constant) and rc.value is True:
                problems.append(f"{where} trust_remote_code=True")
    assert problems == []


def test_every_transformers_from_pretrained_passes_trust_remote_code():
    """D4: passed explicitly, so there is never an interactive prompt (peft's loader takes none)."""
    seen = 0
    for path in sorted(SRC.rglob("*.py")):
        for node, owner, name in _calls(ast.parse(path.read_text())):
            if name == "from_pretrained" and owner != "PeftModel":
                seen += 1
                assert "trust_remote_code" in {k.arg for k in node.keywords}, f"{path.name}:{node.lineno}"
    assert seen >= 4


def test_torch_floor_is_pinned_at_or_above_2_10():
    text = (SRC.parents[1] / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in text
