"""Issue 18 item 2: a small documented search for a method's recipe, on the visible training side only.

    PYTHONPATH=src python -m benchmarks.quality.search --method sigmoid --dataset truthfulqa \
        [--lrs 2e-4,5e-4,1e-3] [--betas 0.1,0.3] [--write-recipe]

Each grid point (lr x beta) is a point of the quality benchmark (`python -m benchmarks.quality`: the
method's recipe with the point's lr and beta over it, one epoch over the same training subsample,
seed 0), evaluated not on the benchmark's dev pairs but on a VALIDATION slice taken from the
training side right after the training pairs (TruthfulQA: train-side questions [N, N+V) of the
split by question; HH: train.jsonl.gz records [N, N+V)). The dev pairs that the quality table
reports on are never trained on or used to choose: selection and report are separate.

Choice: among the points that raise no health flag (the run's own checks, plus kl_drift,
length_drift and length_collapse applied to the validation samples, as in the benchmark), the
highest validation implicit-reward accuracy; a tie within 0.005 goes to the lower KL. No point
without a flag: nothing is chosen and the recipe is left alone. --write-recipe writes the choice
into src/preftune/core/recipes/<method>.yaml (train.lr, loss.beta) with `tuned: true`, what it was tuned
on and the grid's figures as evidence; the quality benchmark then measures it on dev.

Writes benchmarks/quality/search/<dataset>-<method>.json and .md. Budget: a TruthfulQA point is
~3-5 min here (160 pairs), an HH point ~10 min at 160 pairs; the default 6-point grid ~25 min on
TruthfulQA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __main__ as quality  # the benchmark whose points the grid's points are

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

TIE = 0.005


def validation_inputs(data: dict, n_val: int) -> dict:
    """The data set with its "dev" replaced by the validation slice right after the training pairs."""
    path, _, _ = data["train"].rpartition("[")
    n = data["train_pairs"]
    return {**data, "dev": f"{path}[{n}:{n + n_val}]", "dev_pairs": n_val, "role": "validation"}


def point_name(lr: float, beta: float) -> str:
    return f"lr{lr:g}-beta{beta:g}"


def flags_of(row: dict) -> list[str]:
    return list(row.get("flags") or [])


def choose(rows: list[dict]) -> dict | None:
    """The best unflagged point by validation accuracy; within TIE of the best, the lowest KL."""
    ok = [r for r in rows if "error" not in r and not flags_of(r)]
    if not ok:
        return None
    best = max(r["implicit_acc"] for r in ok)
    near = [r for r in ok if r["implicit_acc"] >= best - TIE]
    return min(near, key=lambda r: (r["kl"] if r["kl"] is not None else float("inf")))


def write_recipe(method: str, dataset: str, chosen: dict, result: dict) -> Path:
    """Put the chosen lr and beta into the method's recipe, marked tuned, with the grid as evidence."""
    import yaml

    path = quality.RECIPES / f"{method}.yaml"
    text = path.read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    data = yaml.safe_load(text)
    meta = data.pop("recipe", {}) or {}
    data.setdefault("train", {})["lr"] = chosen["lr"]
    data.setdefault("loss", {})["beta"] = chosen["beta"]
    meta["tuned"] = True
    meta["tuned_on"] = (f"{dataset}: grid lr {result['lrs']} x beta {result['betas']}, one epoch of the recipe on "
                        f"{result['train_pairs']} training pairs, chosen by accuracy on {result['val_pairs']} "
                        f"validation pairs from the training side (no health flag); {result['model']}, LoRA, 2-core CPU")
    meta["confidence"] = (f"medium: searched on one data set ({dataset}) with one model and seed; "
                          "other data and models may want another lr")
    grid = [{"lr": r["lr"], "beta": r["beta"], "val_accuracy": round(r["implicit_acc"], 3),
             "kl": None if r.get("kl") is None else round(r["kl"], 2), "flags": flags_of(r)}
            for r in result["rows"] if "error" not in r]
    meta["evidence"] = [{"data": f"{dataset} search (python -m benchmarks.quality.search)", "command": result["command"],
                         "chosen": {"lr": chosen["lr"], "beta": chosen["beta"]}, "grid": grid},
                        *[e for e in meta.get("evidence", []) if "search" not in str(e.get("data", ""))]]
    body = yaml.safe_dump({"recipe": meta, **data}, sort_keys=False, width=110)
    path.write_text(header + body)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.search", description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True, choices=quality.METHODS)
    ap.add_argument("--dataset", required=True, choices=quality.DATASETS)
    ap.add_argument("--lrs", default="2e-4,5e-4,1e-3")
    ap.add_argument("--betas", default="0.1,0.3")
    ap.add_argument("--pairs", type=int, default=160, help="training pairs (the quality benchmark's default subsample)")
    ap.add_argument("--val", type=int, default=120, help="validation pairs from the training side, after the training ones")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default="runs/quality-search")
    ap.add_argument("--write-recipe", action="store_true", help="write the choice into the method's recipe file")
    a = ap.parse_args(argv)
    needed = {"hh": quality.HH / "train.jsonl.gz", "truthfulqa": quality.TQA}[a.dataset]
    if not needed.is_file():
        print(f"search skipped: the shared data is absent ({needed})")
        return 0
    lrs, betas = [float(x) for x in a.lrs.split(",")], [float(x) for x in a.betas.split(",")]
    key = "hh_pairs" if a.dataset == "hh" else "tqa_pairs"
    s = {**quality.SETTINGS["full"], key: a.pairs}
    out = (ROOT / a.out).resolve()
    data = quality.dataset_inputs(a.dataset, out, s)
    if data["split"] is not None and a.pairs + a.val > data["split"]["train"]:
        sys.exit(f"--pairs {a.pairs} + --val {a.val} exceed the {data['split']['train']} train-side pairs")
    val = validation_inputs(data, a.val)
    t0, rows = time.perf_counter(), []
    base = quality.base_eval(val, out / "validation", s, a.model)  # the validation slice's own start
    for lr in lrs:
        for beta in betas:
            name = point_name(lr, beta)
            print(f"{a.dataset} {a.method} {name} ...", flush=True)
            p = quality.run_point(val, a.method, out, s, a.model, extra=(f"train.lr={lr}", f"loss.beta={beta}"),
                                  name=name)
            row = quality.summarize(val, a.method, p, base)
            rows.append({**row, "lr": lr, "beta": beta, "point": name})
    chosen = choose(rows)
    result = {"command": " ".join(["python -m benchmarks.quality.search", *(argv if argv is not None else sys.argv[1:])]),
              "method": a.method, "dataset": a.dataset, "model": a.model, "lrs": lrs, "betas": betas,
              "train_pairs": a.pairs, "val_pairs": a.val, "validation": quality._rel(val["dev"]),
              "base_val_logp_acc": base.get("logp_acc"), "rows": rows,
              # simpo/orpo's reward is the policy's mean log-prob: its start is the base's mean-log-prob accuracy
              "base_val_mean_logp_acc": base.get("mean_logp_acc") if a.method in quality.REFERENCE_FREE else None,
              "chosen": None if chosen is None else {"lr": chosen["lr"], "beta": chosen["beta"],
                                                     "val_accuracy": chosen["implicit_acc"], "kl": chosen["kl"]},
              "elapsed_s": round(time.perf_counter() - t0, 1)}
    dest = HERE / "search"
    dest.mkdir(exist_ok=True)
    (dest / f"{a.dataset}-{a.method}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (dest / f"{a.dataset}-{a.method}.md").write_text(table(result) + "\n")
    print(table(result))
    if chosen is not None and a.write_recipe:
        print(f"wrote {quality._rel(write_recipe(a.method, a.dataset, chosen, result))}")
    return 0


def table(result: dict) -> str:
    lines = [f"# {result['method']} on {result['dataset']}: lr x beta, chosen on validation pairs",
             "", "| lr | beta | val implicit acc [95% CI] | KL nats | length after/before | flags |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['lr']:g} | {r['beta']:g} | error: {r['error']} | | | |")
            continue
        lo, hi = r["implicit_acc_ci95"]
        ratio = "" if r.get("length_ratio") is None else f"{r['length_ratio']:.2f}"
        lines.append(f"| {r['lr']:g} | {r['beta']:g} | {r['implicit_acc']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{r['kl']:.2f} | {ratio} | {', '.join(flags_of(r)) or 'none'} |")
    c = result["chosen"]
    lines.append("\nChosen: " + ("none (every point raised a flag)" if c is None else
                                 f"lr {c['lr']:g}, beta {c['beta']:g} (validation accuracy {c['val_accuracy']:.3f}, "
                                 f"KL {c['kl']:.2f})")
                 + f". {result['train_pairs']} training pairs, {result['val_pairs']} validation pairs "
                 f"({result['validation']}), base log-prob accuracy there {result['base_val_logp_acc']:.3f}"
                 + ("" if result.get("base_val_mean_logp_acc") is None else
                    f", base mean-log-prob accuracy (this method's own start) {result['base_val_mean_logp_acc']:.3f}")
                 + "; "
                 + f"command `{result['command']}`.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
