"""Memory per process: full fine-tuning with a frozen reference, one process vs FSDP2 on two CPU
processes (configs/accelerate/fsdp.yaml, float32), default model, short HH pairs, same global batch.

    .venv/bin/python -m benchmarks.fsdp            # writes benchmarks/fsdp/results.json

Per run: per-step losses (they must agree), seconds, and per process: peak RSS, RSS at the end, and
the megabytes of weights (policy + frozen reference), gradients and Adam moments it holds (from summary.json). Needs ../shared/data (HH pairs) and the default model (converted once).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "train.jsonl.gz"
ACCELERATE = Path(sys.executable).with_name("accelerate")


def main() -> int:
    argparse.ArgumentParser(prog="python -m benchmarks.fsdp", description=__doc__.split("\n\n")[0]).parse_args()
    if not HH.is_file():
        print(f"benchmark needs {HH}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="fsdp-bench-"))
    with gzip.open(HH, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(16), f)]
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())
    cfg.update(num_processes=2, mixed_precision="no")
    (tmp / "fsdp2.yaml").write_text(yaml.safe_dump(cfg))
    common = [f"data.train_path={data}", "model.lora=false", "train.lr=1e-5", "train.max_steps=2",
              "data.max_length=256", "data.max_prompt_length=128", "diagnostics.probe_every=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # glibc keeps freed heap memory in the process: the weights each process loads whole before
    # sharding stay in its RSS. The same pair of runs with large blocks mmapped (returned on free).
    mmap = {**env, "MALLOC_MMAP_THRESHOLD_": "65536"}
    one = [sys.executable, "-m", "preftune", "train", *common, "train.batch_size=4"]
    two = [str(ACCELERATE), "launch", "--config_file", str(tmp / "fsdp2.yaml"), "-m", "preftune", "train", *common,
           "train.batch_size=2"]
    runs = {"one_process": (one, env), "fsdp_two_processes": (two, env),
            "one_process_mmap": (one, mmap), "fsdp_two_processes_mmap": (two, mmap)}
    out = {"model": "smollm2-135m-instruct (default), full fine-tuning, frozen reference copy",
           "pairs": "first 16 HH harmless train pairs, 2 steps of 4 pairs, max_length 256", "runs": {}}
    for name, (command, run_env) in runs.items():
        run_dir = tmp / name
        done = subprocess.run([*command, f"run.output_dir={run_dir}"], env=run_env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        s = json.loads((run_dir / "summary.json").read_text())
        losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out["runs"][name] = {"losses": losses, "elapsed_s": s["elapsed_s"], "distributed": s["distributed"],
                             "peak_rss_mb_per_process": s["peak_rss_mb_per_process"],
                             "rss_mb_per_process": s["rss_mb_per_process"],
                             "model_state_mb_per_process": s["model_state_mb_per_process"]}
        print(name, out["runs"][name])
    a, b = (out["runs"][k]["losses"] for k in ("one_process", "fsdp_two_processes"))
    out["max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(a, b))
    out["malloc"] = "_mmap runs: MALLOC_MMAP_THRESHOLD_=65536 (glibc returns freed large blocks to the system)"
    (HERE / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
