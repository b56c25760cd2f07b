"""The README's quickstart, run exactly as written (default model: slow), on a small file of our own
pairs named as the README names them."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quickstart() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_quickstart_names_every_step():
    block = quickstart()
    for verb in ("validate-data", "eval --data", "train ", "eval --run", "report", "export"):
        assert f"preftune {verb}" in block, verb


@pytest.mark.slow
def test_the_readme_quickstart_runs_as_written(tmp_path):
    pairs = [{"prompt": f"Question {i}: how are you?", "chosen": " Very well, thank you for asking.",
              "rejected": " Go away."} for i in range(24)]
    (tmp_path / "my_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:16]))
    (tmp_path / "my_heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[16:]))
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", quickstart()], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs/mine/report.html").is_file() and (tmp_path / "exports/mine/config.json").is_file()
    assert json.loads((tmp_path / "runs/mine/eval.json").read_text())["pairs"] == 8
