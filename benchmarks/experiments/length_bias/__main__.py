"""The length-bias trap and its cure, measured.

    .venv/bin/python -m benchmarks.experiments.length_bias [--steps 40] [--out runs/length_bias]

From the shared HH-RLHF harmless train split (absent: says so and stops), a *biased* file is cut
whose chosen completion is longer than the rejected one (in tokens) in 90% of its pairs (720
chosen-longer + 80 chosen-shorter pairs, seeded); `preftune data balance-length` turns it into the
*balanced* file (80 + 80). Both train DPO with the same recipe and the same budget (default model,
LoRA r16 q/v, sigmoid beta 0.1, lr 5e-4, batch 4, the same number of steps, HH rendered as chat
turns cut to 256 tokens, probes every 20 steps so `length_drift` can fire). Then `preftune eval` samples from the
policy and the reference (adapters off) on the same 32 held-out dev prompts, 2 samples each, up
to 96 new tokens, same seeds, and reports mean sample lengths. The figure of merit is the
policy/reference sample-length ratio: the trap makes it grow; balancing should shrink the growth.
Writes results.json and lengths.png beside this file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base"
BIN = ROOT / ".venv" / "bin"


def _preftune(*args: str) -> str:
    proc = subprocess.run([str(BIN / "preftune"), *args], capture_output=True, text=True, cwd=ROOT,
                          env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"})
    if proc.returncode:
        sys.exit(f"preftune {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def biased_file(dest: Path, *, longer: int, shorter: int, seed: int) -> dict:
    """`longer` chosen-longer and `shorter` chosen-shorter HH pairs (token counts of the default
    model's tokenizer, whole completions), in a seeded order; the raw HH lines are kept."""
    from preftune.config import load_config
    from preftune.data.prepare import load_data
    from preftune.data.tokenize import tokenize_records
    from preftune.models.loading import load_tokenizer, resolve_model_dir

    cfg = load_config(None, ["data.hh_as_chat=true", "data.allow_empty_completions=true"])
    records = load_data(str(HH / "train.jsonl.gz"), cfg.data)
    tok = load_tokenizer(resolve_model_dir(cfg.model.name_or_path))
    toks, _ = tokenize_records(records, tok, max_length=10**9, max_prompt_length=10**9 - 1, drop_overlong=True,
                               allow_degenerate=True)
    with gzip.open(HH / "train.jsonl.gz", "rt") as f:
        lines = f.read().splitlines()
    toks = [t for t in toks if min(len(t.chosen_ids), len(t.rejected_ids)) > 1]  # no empty (EOS-only) turn
    up = [t.line for t in toks if len(t.chosen_ids) > len(t.rejected_ids)]
    down = [t.line for t in toks if len(t.chosen_ids) < len(t.rejected_ids)]
    rng = random.Random(seed)
    picked = rng.sample(up, longer) + rng.sample(down, shorter)
    rng.shuffle(picked)
    dest.write_text("".join(lines[n - 1] + "\n" for n in picked))
    return {"pairs": len(picked), "chosen_longer": longer, "chosen_shorter": shorter,
            "pool": {"chosen_longer": len(up), "chosen_shorter": len(down), "all": len(records)}}


def train_and_measure(name: str, data: Path, out: Path, a) -> dict:
    common = ["data.hh_as_chat=true", "data.max_length=256", "data.max_prompt_length=192"]
    run = out / name
    t0 = time.perf_counter()
    _preftune("train", f"data.train_path={data}", f"run.output_dir={run}", "run.overwrite=true",
              f"train.max_steps={a.steps}", "train.epochs=100", "train.batch_size=4", "train.lr=5e-4",
              "loss.beta=0.1", "train.seed=0", "diagnostics.probe_every=20", "eval.max_new_tokens=96", *common)
    train_s = time.perf_counter() - t0
    evaluated = out / f"{name}-eval.json"
    _preftune("eval", "--run", str(run), "--data", str(HH / "dev.jsonl.gz"), "--out", str(evaluated),
              "eval.kl_prompts=32", "eval.kl_samples=2", "eval.max_new_tokens=96", "data.max_records=64", *common)
    e = json.loads(evaluated.read_text())
    summary = json.loads((run / "summary.json").read_text())
    pol, ref = e["sample_length/policy/mean"], e["sample_length/reference/mean"]
    return {"data": str(data.name), "steps": summary["steps"], "train_s": round(train_s, 1),
            "sample_length_policy": pol, "sample_length_reference": ref, "length_ratio": round(pol / ref, 3),
            "kl": round(e["kl"], 3), "heldout_accuracy_implicit": e["accuracy/implicit_reward"],
            "health": summary["health"],
            "probe_lengths": [(r["step"], r["probe/sample_length"], r.get("probe/reference_length"))
                              for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                              if "probe/sample_length" in r]}


def plot(results: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = ["biased", "balanced"]
    ax.bar(names, [results[n]["length_ratio"] for n in names], color=["tab:red", "tab:blue"])
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set(ylabel="policy / reference sample length", title="DPO on length-biased vs balanced pairs")
    fig.tight_layout()
    fig.savefig(dest, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.experiments.length_bias", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="runs/length_bias")
    a = ap.parse_args()
    if not (HH / "train.jsonl.gz").is_file():
        sys.exit(f"{HH}: the shared HH data is absent; nothing to measure")
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    biased, balanced = out / "biased.jsonl", out / "balanced.jsonl"
    made = biased_file(biased, longer=720, shorter=80, seed=0)
    counts = json.loads(_preftune("data", "balance-length", str(biased), "--out", str(balanced),
                                  "data.hh_as_chat=true"))
    results = {"command": " ".join(["python -m benchmarks.experiments.length_bias", *sys.argv[1:]]),
               "biased_file": made, "balance_length": counts}
    for name, data in (("biased", biased), ("balanced", balanced)):
        results[name] = train_and_measure(name, data, out, a)
        print(json.dumps({name: results[name]}), flush=True)
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, HERE / "lengths.png")


if __name__ == "__main__":
    main()
