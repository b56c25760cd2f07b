"""Best-of-N on the demo's sentiment prompts: mean reward of the best of n samples, n = 1, 2, 4, 8.

    .venv/bin/python -m benchmarks.experiments.bon [--prompts 64] [--tokens 32] [--out runs/bon]

Prompts: the demo's own movie-review openings (demo.demo_prompts), its 24 held-out ones first,
then training ones up to --prompts (nothing is trained here, so none of them was seen by the
model). Policy: the default model (SmolLM2-135M-Instruct, GGUF dequantized to fp32), pure
sampling at temperature 1, 8 samples per prompt, seed train.seed=0. Reward: `sentiment` (VADER
compound in [-1, 1]). `preftune bon --eval 1,2,4,8` scores ONE set of 8 samples per prompt and
takes the best of the first n for each n (nested, so per prompt the curve cannot fall); the
figure of merit is how much it rises, with 95% bootstrap intervals over prompts and the paired
gain over n=1. KL is the analytic bound log n - (n-1)/n, not a measurement.
Writes results.json (the command, the curve, wall time) beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.experiments.bon", description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default="runs/bon")
    a = ap.parse_args()
    from preftune.apps.demo import demo_prompts

    train, held_out = demo_prompts()
    prompts = (held_out + train)[: a.prompts]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    args = ["bon", str(out / "prompts.txt"), "--reward", "sentiment", "--eval", "1,2,4,8",
            "--out", str(out / "best.jsonl"), "--pairs", str(out / "pairs.jsonl"), "--eval-out", str(out / "eval.json"),
            f"online.max_new_tokens={a.tokens}", "train.seed=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "preftune", *args], capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"preftune bon failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    print(proc.stdout)
    result = json.loads((out / "eval.json").read_text())
    result.update(command="preftune " + " ".join(args), model="smollm2-135m-instruct (default)",
                  wall_s=round(wall, 1), cpu_threads=os.cpu_count())
    (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
