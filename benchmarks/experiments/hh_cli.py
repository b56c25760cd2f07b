"""What the experiments share (sft_dpo, reward_model; frontier and benchmarks/quality use the
logged runner): where things are, the HH rendering and budget settings, and running the
`preftune` CLI with its wall time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base"
BIN = ROOT / ".venv" / "bin"
# HH transcripts as chat turns, cut to 256 tokens (prompt 192), the four empty replies kept and counted
HH_SETTINGS = ["data.hh_as_chat=true", "data.max_length=256", "data.max_prompt_length=192",
               "data.allow_empty_completions=true"]
RECIPE = ["train.batch_size=4", "train.lr=5e-4", "train.seed=0"]


def preftune(*args: str) -> tuple[str, float]:
    """stdout and wall-clock seconds of `preftune ARGS`; a failure stops the experiment with stderr's tail."""
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "preftune"), *args], capture_output=True, text=True, cwd=ROOT,
                          env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"})
    if proc.returncode:
        sys.exit(f"preftune {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout, round(time.perf_counter() - t0, 1)


def require_hh() -> None:
    if not (HH / "train.jsonl.gz").is_file():
        sys.exit(f"{HH}: the shared HH data is absent; nothing to measure")


def python_logged(args: list[str], log: Path) -> tuple[int, float]:
    """`python ARGS` with this checkout's src first on the path (works from a git worktree
    without its own .venv), offline, its output to `log`: (exit code, wall seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    return code, round(time.perf_counter() - t0, 1)


def preftune_logged(args: list[str], log: Path) -> tuple[int, float]:
    """`python -m preftune ARGS` through python_logged."""
    return python_logged(["-m", "preftune", *args], log)
