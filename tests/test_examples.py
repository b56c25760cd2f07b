"""examples/: each script runs as written (on the tiny model, through PREFTUNE_EXAMPLE_MODEL) and
prints what it promises; `slow` runs them on the default model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = {"dpo_own_data.py": "held-out implicit-reward accuracy", "sft_then_dpo.py": "dpo from it:",
           "grpo_arithmetic.py": "grpo: 4 steps;", "notebook_api.py": "held-out accuracy"}


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")} == set(SCRIPTS)


def _run(script: str, tmp_path: Path, model: str | None, steps: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFTUNE_EXAMPLE_OUT": str(tmp_path / "runs"),
           "PREFTUNE_EXAMPLE_STEPS": str(steps), "PYTHONWARNINGS": "ignore"}
    if model:
        env["PREFTUNE_EXAMPLE_MODEL"] = model
    return subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=900)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs_on_the_tiny_model(script, tmp_path, tiny_model_dir):
    done = _run(script, tmp_path, str(tiny_model_dir), 4)
    assert done.returncode == 0, done.stderr[-3000:]
    assert SCRIPTS[script] in done.stdout, done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs_on_the_default_model(script, tmp_path):
    done = _run(script, tmp_path, None, 2)
    assert done.returncode == 0, done.stderr[-3000:]
