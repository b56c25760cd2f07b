"""Issue 18 item 2, issue 39 item 4: a small documented search for a method's recipe, chosen on the
visible training side only; the dev pairs are measured once, at the end, for the chosen point.

    PYTHONPATH=src python -m benchmarks.quality.search --method sigmoid --dataset truthfulqa \
        [--lrs 2e-4,5e-4,1e-3] [--betas 0.1,0.3] [--folds 5] [--write-recipe]

Each grid point (lr x beta) is a point of the quality benchmark (`python -m benchmarks.quality`: the
method's recipe with the point's lr and beta over it, one epoch over the same training subsample,
seed 0), scored not on the benchmark's dev pairs but on VALIDATION pairs from the training side:
- by default the slice right after the training pairs (TruthfulQA: train-side questions [N, N+V)
  of the split by question; HH: train.jsonl.gz records [N, N+V)), cut short where the second
  split's dev pairs begin (`python -m benchmarks.quality --split second` takes the last dev-sized
  slice of the training side; TruthfulQA's default [160, 280) becomes [160, 276));
- with --folds K (for a small training side) K-fold over the N training pairs themselves, grouped
  by prompt (core/stats.kfold, seed 0; a training prompt that is also a dev prompt is an error):
  K trainings per grid point on (K-1)/K of the pairs, the accuracy pooled over every pair's one
  validation (fold files under --out/folds/), KL the folds' mean, flags the union.

Choice: among the points that raise no health flag (the run's own checks, plus kl_drift,
length_drift and length_collapse applied to the validation samples, as in the benchmark), the
highest validation implicit-reward accuracy; a tie within 0.005 goes to the lower KL. No point
without a flag: nothing is chosen and the recipe is left alone. --write-recipe writes the choice
into src/preftune/core/recipes/<method>.yaml (train.lr, loss.beta) with `tuned: true`, what it was tuned
on and the grid's figures as evidence. Only then is dev read: the chosen point is trained on the N
training pairs and evaluated once on the dev pairs; the output reports it apart from the
validation figures ("Dev (measured once, after the choice ...)"), and nothing is chosen on it. The
quality benchmark with --seeds then measures the recipe as the table reports it. A recipe holds one
lr and beta for every data set: --record-evidence writes a second data set's search (grid, choice,
dev figure) into the evidence beside the first's, and leaves the settings as they are.

Writes benchmarks/quality/search/<dataset>-<method>[-k<K>].json and .md. Budget: a TruthfulQA point is
~3-5 min here (160 pairs), an HH point ~10 min at 160 pairs; the default 6-point grid ~25 min on
TruthfulQA, plus one point for dev; --folds K multiplies the grid's training by K x (K-1)/K.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import sys
import time
from pathlib import Path

from benchmarks.experiments.hh_cli import HH

# the quality benchmark's points: the grid's points are run and read as they are
from .points import _rel, base_eval, dataset_inputs, run_point
from .protocol import second_split
from .settings import DATASETS, METHODS, RECIPES, REFERENCE_FREE, SETTINGS, TQA
from .table_rows import summarize

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

TIE = 0.005


def validation_inputs(data: dict, n_val: int, stop: int | None = None) -> dict:
    """The data set with its "dev" replaced by the validation slice right after the training pairs,
    ending at `stop` at the latest (the second split's dev starts there: it must stay unseen)."""
    path, _, _ = data["train"].rpartition("[")
    n = data["train_pairs"]
    end = n + n_val if stop is None else min(n + n_val, stop)
    if end <= n:
        raise ValueError(f"no validation pairs left between the {n} training pairs and record {stop}")
    return {**data, "dev": f"{path}[{n}:{end}]", "dev_pairs": end - n, "role": "validation"}


def _lines(path: str, n: int) -> list[str]:
    """The first n records (non-empty lines) of a JSONL file, gzipped or not, as written."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line if line.endswith("\n") else line + "\n" for line in itertools.islice(
            (x for x in f if x.strip()), n)]


def _prompt_keys(path: str, settings: list[str]) -> list[str]:
    """One key per record of `path` (a file or record slice): its prompt, as the data loader reads it."""
    from preftune.data.sources import load_records

    empty = "data.allow_empty_completions=true" in settings
    return [json.dumps(r.prompt, sort_keys=True) for r in load_records(path, allow_empty_completions=empty)]


def fold_inputs(data: dict, k: int, dest: Path) -> list[dict]:
    """k (fit, validation) data sets over the training pairs `data["train"]` (the first N of the
    training side), grouped by prompt so no prompt is on both sides of a fold (stats.kfold, seed
    0), a training prompt that is also a dev prompt being an error: each a copy of `data` whose
    "train" is fold i's fit file and "dev" its validation file, written under `dest`."""
    from preftune.core.stats import kfold

    n, settings = data["train_pairs"], data["settings"]
    lines, keys = _lines(data["side"], n), _prompt_keys(data["train"], settings)
    if len(lines) != len(keys):
        raise ValueError(f"{data['train']}: {len(lines)} lines but {len(keys)} records")
    folds = kfold(keys, k, seed=0, exclude=_prompt_keys(data["dev"], settings))
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (fit, val) in enumerate(folds):
        files = {side: dest / f"fold{i}-{side}.jsonl" for side in ("fit", "val")}
        for side, idx in (("fit", fit), ("val", val)):
            files[side].write_text("".join(lines[j] for j in idx))
        out.append({**data, "train": str(files["fit"]), "dev": str(files["val"]), "train_pairs": len(fit),
                    "dev_pairs": len(val), "tag": f"{data['tag']}-k{k}-fold{i}", "role": "validation"})
    return out


def pool_folds(rows: list[dict]) -> dict:
    """One grid point's validation figures over its folds: accuracy pooled over every validation
    pair (each training pair is validated exactly once), its Wilson interval, KL and length ratio
    the folds' mean, flags the union (each with its fold); a failed fold fails the point."""
    from preftune.core.stats import wilson

    failed = next((r for r in rows if "error" in r), None)
    if failed is not None:
        return failed
    m = [r["dev_pairs"] for r in rows]
    right = math.fsum(r["implicit_acc"] * n for r, n in zip(rows, m))
    kls = [r["kl"] for r in rows if r["kl"] is not None]
    ratios = [r["length_ratio"] for r in rows if r["length_ratio"] is not None]
    return {**rows[0], "implicit_acc": right / sum(m), "implicit_acc_ci95": wilson(right, sum(m)),
            "kl": math.fsum(kls) / len(kls) if kls else None,
            "length_ratio": math.fsum(ratios) / len(ratios) if ratios else None,
            "flags": [f"{f} (fold {i})" for i, r in enumerate(rows) for f in r["flags"]], "folds": len(rows),
            "fold_accuracies": [r["implicit_acc"] for r in rows], "val_pairs": sum(m)}


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


def _edit_recipe(method: str, edit) -> Path:
    """Rewrite the method's recipe file as `edit(data)` leaves its parsed YAML, keeping the file's
    leading comment lines (YAML drops comments inside the body)."""
    import yaml

    path = RECIPES / f"{method}.yaml"
    text = path.read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    data = yaml.safe_load(text)
    edit(data)
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=110))
    return path


def write_recipe(method: str, dataset: str, chosen: dict, result: dict, settings: bool = True) -> Path:
    """Put the chosen lr and beta into the method's recipe, marked tuned, with the grid as evidence;
    `settings=False` (--record-evidence): the grid and its choice join the evidence, and the
    recipe's settings, `tuned_on` and `confidence` stay as they are (another data set's search set
    them; a recipe has one lr and beta for every data set)."""
    return _edit_recipe(method, lambda data: _chosen_into(data, dataset, chosen, result, settings))


def _chosen_into(data: dict, dataset: str, chosen: dict, result: dict, settings: bool = True) -> None:
    meta = data.pop("recipe", {}) or {}
    if settings:
        data.setdefault("train", {})["lr"] = chosen["lr"]
        data.setdefault("loss", {})["beta"] = chosen["beta"]
        meta["tuned"] = True
        how = (f"{result['folds']}-fold validation over them (grouped by prompt)" if result.get("folds") else
               f"accuracy on {result['val_pairs']} validation pairs from the training side")
        meta["tuned_on"] = (f"{dataset}: grid lr {result['lrs']} x beta {result['betas']}, one epoch of the recipe on "
                            f"{result['train_pairs']} training pairs, chosen by {how} (no health flag; dev never "
                            f"read); {result['model']}, LoRA, 2-core CPU")
        meta["confidence"] = (f"medium: searched on one data set ({dataset}) with one model and seed; "
                              "other data and models may want another lr")
    grid = [{"lr": r["lr"], "beta": r["beta"], "val_accuracy": round(r["implicit_acc"], 3),
             "kl": None if r.get("kl") is None else round(r["kl"], 2), "flags": flags_of(r)}
            for r in result["rows"] if "error" not in r]
    label = f"{dataset} search (python -m benchmarks.quality.search)"
    entry = {"data": label, "command": result["command"], "chosen": {"lr": chosen["lr"], "beta": chosen["beta"]},
             "grid": grid}
    if not settings:
        entry["settings"] = "evidence only: the recipe's lr and beta were not changed by this search"
    # this data set's earlier search is replaced; another data set's search stays
    meta["evidence"] = [entry, *[e for e in meta.get("evidence", []) if e.get("data") != label]]
    rest = dict(data)
    data.clear()
    data.update({"recipe": meta, **rest})  # the recipe's metadata first, as the files are written


def add_dev(method: str, dev: dict) -> Path:
    """Add the dev measurement (taken after the choice) to the search's evidence in the recipe, as
    the line the search's .md prints; the choice is not touched."""
    return _edit_recipe(method, lambda data: data["recipe"]["evidence"][0].update(dev_measured_once=dev_line(dev)))


def grid_row(data: dict, method: str, out: Path, s: dict, model: str, lr: float, beta: float,
             folds: list[dict] | None) -> dict:
    """One grid point scored on validation pairs only: the slice after the training pairs, or
    pooled over the k folds of the training pairs (each fold's own base evaluation)."""
    name, extra = point_name(lr, beta), (f"train.lr={lr}", f"loss.beta={beta}")
    if folds is None:
        base = base_eval(data, out / "validation", s, model)
        p = run_point(data, method, out, s, model, extra=extra, name=name)
        row = summarize(data, method, p, base)
    else:
        row = pool_folds([summarize(f, method, run_point(f, method, out, s, model, extra=extra, name=f"{name}/fold{i}"),
                                    base_eval(f, out / "validation", s, model))
                          for i, f in enumerate(folds)])
    return {**row, "lr": lr, "beta": beta, "point": name}


def measure_dev(data: dict, method: str, out: Path, s: dict, model: str, chosen: dict) -> dict:
    """The chosen point, trained on the training pairs, measured once on the dev pairs (after the
    choice, which never reads it): the benchmark's figures for the recipe the search picked."""
    extra = (f"train.lr={chosen['lr']}", f"loss.beta={chosen['beta']}")
    base = base_eval(data, out, s, model)
    p = run_point(data, method, out, s, model, extra=extra, name=f"dev-{point_name(chosen['lr'], chosen['beta'])}")
    r = summarize(data, method, p, base)
    if "error" in r:
        return {"error": r["error"], "log": r.get("log")}
    return {k: r[k] for k in ("dev_pairs", "before_logp_acc", "implicit_acc", "implicit_acc_ci95", "gain", "gain_ci95",
                              "gain_interval", "kl", "flags", "wall_s")} | {"data": _rel(data["dev"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.search", description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--dataset", required=True, choices=DATASETS)
    ap.add_argument("--lrs", default="2e-4,5e-4,1e-3")
    ap.add_argument("--betas", default="0.1,0.3")
    ap.add_argument("--pairs", type=int, default=160, help="training pairs (the quality benchmark's default subsample)")
    ap.add_argument("--val", type=int, default=120, help="validation pairs from the training side, after the training "
                    "ones (ending before the second split's dev slice)")
    ap.add_argument("--folds", type=int, default=0, help="K >= 2: choose by K-fold validation over the training pairs "
                    "themselves (grouped by prompt; K trainings per grid point) instead of the slice after them")
    ap.add_argument("--dev", type=int, help="dev pairs for the one measurement at the end (HH: the first N of 200, "
                    "default 100; TruthfulQA: default all 168), as the quality table's --hh-dev/--tqa-dev")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default="runs/quality-search")
    ap.add_argument("--write-recipe", action="store_true", help="write the choice into the method's recipe file")
    ap.add_argument("--record-evidence", action="store_true", help="add the grid, its choice and the dev figure to the "
                    "recipe's evidence without changing its settings (they were chosen on another data set)")
    a = ap.parse_args(argv)
    needed = {"hh": HH / "train.jsonl.gz", "truthfulqa": TQA}[a.dataset]
    if not needed.is_file():
        print(f"search skipped: the shared data is absent ({needed})")
        return 0
    lrs, betas = [float(x) for x in a.lrs.split(",")], [float(x) for x in a.betas.split(",")]
    key = "hh_pairs" if a.dataset == "hh" else "tqa_pairs"
    s = {**SETTINGS["full"], key: a.pairs}
    if a.dev is not None:
        s["hh_dev" if a.dataset == "hh" else "tqa_dev"] = a.dev
    out = (ROOT / a.out).resolve()
    data = dataset_inputs(a.dataset, out, s)
    # the second split's dev pairs (quality --split second) are the end of the training side: never used here
    second_start = second_split(data["side_pairs"], data["dev_pairs"])[0]
    if a.pairs > second_start:
        sys.exit(f"--pairs {a.pairs} reach into the second split's dev pairs (training-side records from {second_start})")
    if a.folds:
        folds, val = fold_inputs(data, a.folds, out / "folds" / f"{a.dataset}-n{a.pairs}-k{a.folds}"), None
        validation = f"{a.folds}-fold over the {a.pairs} training pairs, grouped by prompt"
    else:
        folds, val = None, validation_inputs(data, a.val, stop=second_start)
        validation = _rel(val["dev"])
    t0, rows = time.perf_counter(), []
    for lr in lrs:
        for beta in betas:
            print(f"{a.dataset} {a.method} {point_name(lr, beta)} ...", flush=True)
            rows.append(grid_row(val or data, a.method, out, s, a.model, lr, beta, folds))
    chosen = choose(rows)  # validation only: the dev pairs are not read before this line
    base_val = None if folds else base_eval(val, out / "validation", s, a.model)
    result = {"command": " ".join(["python -m benchmarks.quality.search", *(argv if argv is not None else sys.argv[1:])]),
              "method": a.method, "dataset": a.dataset, "model": a.model, "lrs": lrs, "betas": betas,
              "train_pairs": a.pairs, "val_pairs": sum(f["dev_pairs"] for f in folds) if folds else val["dev_pairs"],
              "folds": a.folds or None, "validation": validation,
              "base_val_logp_acc": None if base_val is None else base_val.get("logp_acc"), "rows": rows,
              # simpo/orpo's reward is the policy's mean log-prob: its start is the base's mean-log-prob accuracy
              "base_val_mean_logp_acc": base_val.get("mean_logp_acc") if base_val and a.method in REFERENCE_FREE
              else None,
              "chosen": None if chosen is None else {"lr": chosen["lr"], "beta": chosen["beta"],
                                                     "val_accuracy": chosen["implicit_acc"], "kl": chosen["kl"]}}
    if chosen is not None and (a.write_recipe or a.record_evidence):
        print(f"wrote {_rel(write_recipe(a.method, a.dataset, chosen, result, settings=a.write_recipe))}")
    result["dev"] = None if chosen is None else measure_dev(data, a.method, out, s, a.model, chosen)
    if chosen is not None and (a.write_recipe or a.record_evidence):  # written before dev was read; now its one figure
        add_dev(a.method, result["dev"])
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    dest = HERE / "search"
    dest.mkdir(parents=True, exist_ok=True)
    stem = f"{a.dataset}-{a.method}" + (f"-k{a.folds}" if a.folds else "")
    (dest / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (dest / f"{stem}.md").write_text(table(result) + "\n")
    print(table(result))
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
    c, base = result["chosen"], result.get("base_val_logp_acc")
    lines.append("\nChosen on validation: " + ("none (every point raised a flag)" if c is None else
                 f"lr {c['lr']:g}, beta {c['beta']:g} (validation accuracy {c['val_accuracy']:.3f}, KL {c['kl']:.2f})")
                 + f". {result['train_pairs']} training pairs, {result['val_pairs']} validation pairs "
                 f"({result['validation']})" + ("" if base is None else f", base log-prob accuracy there {base:.3f}")
                 + ("" if result.get("base_val_mean_logp_acc") is None else
                    f", base mean-log-prob accuracy (this method's own start) {result['base_val_mean_logp_acc']:.3f}")
                 + "; "
                 + f"command `{result['command']}`.")
    lines.append("\n" + dev_line(result.get("dev")))
    return "\n".join(lines)


def dev_line(d: dict | None) -> str:
    """The chosen point on the dev pairs, measured once after the choice: reported, never selected on."""
    if d is None:
        return "Dev: not measured (nothing chosen, or a search from before dev was measured at the end)."
    if "error" in d:
        return f"Dev: failed ({d['error']}, {d['log']})."
    lo, hi = d["gain_ci95"]
    return (f"Dev (measured once, after the choice; never used to choose): {d['dev_pairs']} pairs ({d['data']}), "
            f"implicit accuracy {d['implicit_acc']:.3f}, gain {d['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] over the base "
            f"model's log-prob accuracy {d['before_logp_acc']:.3f}, KL {d['kl']:.2f}, flags {', '.join(d['flags']) or 'none'}.")


if __name__ == "__main__":
    sys.exit(main())
