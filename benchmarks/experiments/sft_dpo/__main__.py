"""SFT -> DPO on the default model, each stage measured on held-out data.

    .venv/bin/python -m benchmarks.experiments.sft_dpo [--pairs 400] [--dpo-steps 100] [--base-dpo]

From the shared HH-RLHF harmless data (absent: says so and stops), rendered as chat turns, cut to
256 tokens (prompt 192), LoRA r16 q/v, batch 4, seed 0:
On this 2-core CPU a step of 4 HH pairs takes ~15-30 s, so the committed figures use a small
budget: `--pairs 160 --dpo-steps 40 --dev 100` (~40 minutes).
1. `preftune sft` on the chosen side of the first `--pairs` train pairs (one epoch, lr 5e-4): the
   DPO paper's recipe when no SFT model exists ("SFT on the preferred completions"). Held out:
   NLL/token and perplexity of the dev pairs' chosen completions, before and after.
2. `preftune eval` of the SFT model on the dev pairs (the DPO stage's "before": log-prob
   accuracy, the implicit-reward accuracy being undefined while policy == reference).
3. `preftune train` (DPO, sigmoid beta 0.1, lr 5e-4, `--dpo-steps` steps) on the same pairs,
   starting from the SFT adapter, which is also the reference (reference.json names it).
   Held out: implicit-reward and log-prob accuracy on the dev pairs (95% intervals).
With `--base-dpo`, the same DPO from the base model for comparison.
Writes results.json beside this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.experiments.hh_cli import HH, HH_SETTINGS, RECIPE, ROOT, require_hh
from benchmarks.experiments.hh_cli import preftune as _preftune

HERE = Path(__file__).resolve().parent

COMMON = [*HH_SETTINGS, *RECIPE, "diagnostics.probe_every=0"]


def _accuracies(e: dict) -> dict:
    keys = ("accuracy/implicit_reward", "accuracy/implicit_reward_ci95", "accuracy/logp", "accuracy/logp_ci95",
            "rewards/margins", "pairs")
    return {k: e.get(k) for k in keys}


def dpo(name: str, out: Path, train: str, dev: str, a, *extra: str) -> dict:
    run = out / name
    _, secs = _preftune("train", f"data.train_path={train}", f"data.eval_path={dev}", f"run.output_dir={run}",
                        "run.overwrite=true", f"train.max_steps={a.dpo_steps}", "train.epochs=100", "loss.beta=0.1",
                        *COMMON, *extra)
    s = json.loads((run / "summary.json").read_text())
    return {"train_s": secs, "steps": s["steps"], "health": s["health"], "after": _accuracies(s["eval"]),
            "reference": json.loads((run / "reference.json").read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.experiments.sft_dpo", description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--dpo-steps", type=int, default=100)
    ap.add_argument("--dev", type=int, default=200, help="held-out dev pairs (the first N of 200)")
    ap.add_argument("--base-dpo", action="store_true", help="also DPO from the base model, same budget")
    ap.add_argument("--out", default="runs/sft_dpo")
    a = ap.parse_args()
    require_hh()
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    train, dev = f"{HH / 'train.jsonl.gz'}[:{a.pairs}]", f"{HH / 'dev.jsonl.gz'}[:{a.dev}]"
    results = {"command": " ".join(["python -m benchmarks.experiments.sft_dpo", *sys.argv[1:]]), "train": train,
               "dev": dev}

    stdout, secs = _preftune("sft", f"data.train_path={train}", f"data.eval_path={dev}",
                             f"run.output_dir={out / 'sft'}", "run.overwrite=true", "train.epochs=1", *COMMON)
    s = json.loads((out / "sft" / "summary.json").read_text())
    results["sft"] = {"train_s": secs, "steps": s["steps"], "examples": s["data"]["examples"], "health": s["health"],
                      "heldout": s["eval"]}
    print(json.dumps({"sft": results["sft"]}), flush=True)

    adapter = out / "sft" / "model"
    before = out / "sft-dev-eval.json"
    _, secs = _preftune("eval", "--data", dev, "--out", str(before), f"model.adapter_name_or_path={adapter}",
                        *HH_SETTINGS, "train.seed=0")
    results["dpo_from_sft"] = {"before": {**_accuracies(json.loads(before.read_text())), "eval_s": secs}}
    results["dpo_from_sft"].update(dpo("dpo-from-sft", out, train, dev, a, f"model.adapter_name_or_path={adapter}"))
    print(json.dumps({"dpo_from_sft": results["dpo_from_sft"]}), flush=True)

    if a.base_dpo:
        base = out / "base-dev-eval.json"
        _preftune("eval", "--data", dev, "--out", str(base), *HH_SETTINGS)
        results["dpo_from_base"] = {"before": _accuracies(json.loads(base.read_text()))}
        results["dpo_from_base"].update(dpo("dpo-from-base", out, train, dev, a))
        print(json.dumps({"dpo_from_base": results["dpo_from_base"]}), flush=True)
    (HERE / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
