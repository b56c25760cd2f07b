"""Reward models on HH-RLHF harmless, held-out on the 200 dev pairs, beside DPO's implicit reward.

    .venv/bin/python -m benchmarks.experiments.reward_model [--pairs 400] [--members 3]

From the shared HH-RLHF harmless data (absent: says so and stops), rendered as chat turns, cut to
256 tokens (prompt 192), default model, LoRA r16 q/v plus the new score head, batch 4, lr 5e-4,
one epoch, seed 0 (a step of 4 pairs takes ~15-30 s on this 2-core CPU: the committed figures
use `--pairs 160 --members 3 --member-pairs 80 --dev 100`, the single model on the same pairs and
dev slice as sft_dpo's DPO runs):
1. `preftune train-rm` on the first `--pairs` train pairs: the same pairs (and budget in pairs)
   as the DPO runs of benchmarks/experiments/sft_dpo, so the two accuracies sit side by side.
   Held out: pair accuracy (Wilson 95% interval) and calibration (ECE) on the dev pairs.
2. `preftune train-rm --ensemble K --split disjoint` on the first K x `--member-pairs` train pairs
   (each member sees `--member-pairs` disjoint pairs): each member's held-out accuracy, the ensemble's (mean
   margin), how often the members disagree in sign, and the mean spread of their margins,
   measured by scoring the dev pairs through `rm:RUN`, the path every consumer uses.
The DPO figures are read from benchmarks/experiments/sft_dpo/results.json when it exists.
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

COMMON = [*HH_SETTINGS, *RECIPE, "train.epochs=1", "run.overwrite=true"]


def _eval(ev: dict) -> dict:
    return {"pairs": ev["pairs"], "accuracy": ev["accuracy/implicit_reward"],
            "accuracy_ci95": ev["accuracy/implicit_reward_ci95"], "ece": ev["calibration"]["ece"],
            "margin": ev["rewards/margins"]}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.experiments.reward_model", description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--member-pairs", type=int, default=0, help="pairs per ensemble member (default: --pairs)")
    ap.add_argument("--dev", type=int, default=200, help="held-out dev pairs (the first N of 200)")
    ap.add_argument("--out", default="runs/reward_model")
    ap.add_argument("--reuse-single", action="store_true", help="keep the single model already trained under --out "
                    "on the same pairs (its wall time from results.json) and train only the ensemble")
    ap.add_argument("--reuse-ensemble", action="store_true", help="keep the ensemble members already trained under "
                    "--out on the same pairs and redo only their held-out scoring through rm:")
    a = ap.parse_args()
    require_hh()
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    dev = f"{HH / 'dev.jsonl.gz'}[:{a.dev}]"
    results = {"command": " ".join(["python -m benchmarks.experiments.reward_model", *sys.argv[1:]]), "dev": dev}

    train = f"{HH / 'train.jsonl.gz'}[:{a.pairs}]"
    previous = json.loads((HERE / "results.json").read_text()) if (HERE / "results.json").is_file() else {}
    if a.reuse_single and (out / "single" / "summary.json").is_file() and previous.get("single", {}).get("train") == train:
        secs = previous["single"]["train_s"]  # the finished single model of an earlier invocation, same pairs
    else:
        _, secs = _preftune("train-rm", f"data.train_path={train}", f"data.eval_path={dev}",
                            f"run.output_dir={out / 'single'}", *COMMON)
    s = json.loads((out / "single" / "summary.json").read_text())
    results["single"] = {"train": train, "train_s": secs, "steps": s["steps"], "heldout": _eval(s["eval"]),
                         "health": s["health"]}
    print(json.dumps({"single": results["single"]}), flush=True)

    per_member = a.member_pairs or a.pairs
    train = f"{HH / 'train.jsonl.gz'}[:{per_member * a.members}]"
    done = [out / "ensemble" / f"member-{k}" / "summary.json" for k in range(a.members)]
    if a.reuse_ensemble and all(f.is_file() for f in done) and previous.get("ensemble", {}).get("train") == train:
        # the members of an earlier invocation on the same pairs: only the held-out scoring through
        # `rm:` is redone (with this checkout's scoring code); training wall time from results.json
        from preftune.config import load_config
        from preftune.runs.rm import ensemble_heldout

        secs = previous["ensemble"]["train_s"]
        cfg = load_config(out / "ensemble" / "member-0" / "config.yaml", [f"data.eval_path={dev}"])
        (out / "ensemble" / "ensemble_eval.json").write_text(
            json.dumps(ensemble_heldout(out / "ensemble", cfg), indent=2) + "\n")
    else:
        _, secs = _preftune("train-rm", "--ensemble", str(a.members), "--split", "disjoint",
                            f"data.train_path={train}", f"data.eval_path={dev}",
                            f"run.output_dir={out / 'ensemble'}", *COMMON)
    members = [_eval(json.loads((out / "ensemble" / f"member-{k}" / "summary.json").read_text())["eval"])
               for k in range(a.members)]
    results["ensemble"] = {"train": train, "members": a.members, "train_s": secs, "member_heldout": members,
                           "heldout": json.loads((out / "ensemble" / "ensemble_eval.json").read_text())}
    print(json.dumps({"ensemble": results["ensemble"]}), flush=True)

    dpo = HERE.parent / "sft_dpo" / "results.json"
    if dpo.is_file():
        d = json.loads(dpo.read_text())
        results["dpo_implicit_reward_same_dev_pairs"] = {
            k: {"train": d["train"], **d[k]["after"]} for k in ("dpo_from_base", "dpo_from_sft") if k in d}
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
