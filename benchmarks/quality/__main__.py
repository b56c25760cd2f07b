"""Held-out quality of every preference method on the shared data: before and after, on CPU.

    PYTHONPATH=src python -m benchmarks.quality [--out runs/quality] [--methods sigmoid,kto] [--datasets hh]
    PYTHONPATH=src python -m benchmarks.quality --quick --model TINY_DIR     # smoke test (results in --out)

What it measures. For each method (sigmoid = DPO, ipo, cdpo, simpo, orpo, kto, rpo = DPO + SFT mix)
and each shared data set, one LoRA run trained with the method's recipe, then on held-out pairs
the run never saw:
- implicit-reward accuracy (the method's own reward: beta * log-ratio for the reference losses and
  KTO, beta * mean log-prob for simpo/orpo, DPO's for the rpo mix) and raw log-prob accuracy
  (summed completion log-probs), each with a Wilson 95% interval (an exact tie counts half);
- the mean implicit-reward margin; KL(policy || reference) in nats per sample, Monte-Carlo over
  fresh policy samples, and the mean sample length of policy and reference (same prompts, same
  seed); health flags; wall time of the point (training + evaluation processes);
- "before": the base model once per data set (`preftune eval` without --run; one forward per
  pair). Its log-prob accuracy is every method's baseline. Under the simpo scorer, whose reward
  needs no reference, the same call also gives the base model's mean-log-prob accuracy: the
  starting value of simpo's and orpo's own implicit reward (eval flags it "undefined" because
  policy == reference, which is true only for the reference-based rewards).
- gain = implicit-reward accuracy after - log-prob accuracy before. Its interval is paired where
  the eval has per-pair outcomes: `preftune eval --run` of a method with a reference writes
  `paired` (the reference, i.e. the base model, is the before, read in the same forward passes):
  a percentile bootstrap over pairs that keeps each pair's before and after together, and
  McNemar's exact p (`gain_mcnemar_p`). Otherwise (simpo/orpo: no reference) it is Newcombe's
  hybrid score interval for two independent proportions (1998, method 10) from the two Wilson
  intervals, too wide when the outcomes are positively correlated over pairs, too narrow when
  negatively; each row's `gain_interval` says which. The same holds for the log-prob accuracy
  change; simpo/orpo's gain over the base model's own mean-log-prob accuracy is Newcombe's.
  Several seeds of a point combine in seeds.py (mean, spread, a seeds-x-pairs interval, tuned
  only if the gain holds across seeds).

How. Everything runs through the `preftune` CLI, one process per step, each point its own run
directory under --out (a rerun keeps a finished point whose settings are unchanged, and redoes
one whose settings, recipe or model changed). Recipes: `src/preftune/core/recipes/<method>.yaml` when
it exists (passed as `--config`, its top-level `recipe:` metadata block stripped), else the
built-in settings in settings.BUILTIN; results.json records which, and the resolved loss, lr,
batch and steps from the run's config.yaml and summary.json. The schedule (lr, batch, epochs)
is the recipe's; the benchmark fixes over any recipe only the data (a subsample: the budget's
lever), seed 0, and no held-out data in training (data.eval_path empty, probes off, keep_best
off: the dev pairs are never seen or used for selection). Every recipe and built-in setting runs
one epoch today, at 4 or 8 pairs per step (KTO: 8 examples = 4 pairs' two sides), so each point
sees each of its training pairs once: the methods get equal compute per pair, not equal steps.
With probes off the run's own kl_drift, length_drift and length_collapse checks cannot fire; the
same checks are applied to the evaluation's sampled KL and lengths with the run's thresholds
(diagnostics.kl_max, length_growth, length_shrink) and reported as "kl_drift (eval)",
"length_drift (eval)" and "length_collapse (eval)". KL and lengths:
`preftune eval --run` with eval.kl_prompts=16 held-out prompts x eval.kl_samples=2 samples x 48
new tokens (policy and reference each; lengths are capped at 48 tokens). That is the cheapest
honest KL: eval loads both models anyway, and the training probes would sample the same way
during training.

Data (../shared/data; absent: one line, exit 0; never copied into the repository):
- hh: HH-RLHF harmless, rendered as chat turns, cut to 256 tokens (prompt 192), empty replies
  kept (hh_cli.HH_SETTINGS); training = the first --hh-pairs pairs of train.jsonl.gz, held out =
  the first --hh-dev pairs of dev.jsonl.gz (train and dev share no prompt).
- truthfulqa: TruthfulQA.visible.csv (612 questions, one pair each: Best Answer over the first
  Incorrect Answer, preftune's own CSV adapter) split by question: a question goes to dev when
  sha256 of its lower-cased, whitespace-collapsed text, as an integer mod 100, is below 30. The
  split is written as JSONL rows (the CSV's columns) under --out/data/, checked to share no
  question, and never committed: 444 train-side and 168 dev questions. 70/30 rather than 80/20
  because the dev size sets the width of every interval (168 dev pairs: +-0.106 on a gain at
  accuracies near 0.5, against +-0.124 for the ~122 of an 80/20 split) and training uses only
  the first --tqa-pairs of the 444 train-side pairs anyway. KTO reads the same pairs as unpaired
  examples (data.paired_to_unpaired=true: chosen desirable, rejected undesirable), so every
  method sees the same information; the 16,811 truth-label answers are not used.

Budget (default mode, 7 methods x 2 data sets = 14 points + 2 base evaluations) on this 2-core
CPU, from the rates in settings.RATES (a step of 4 HH pairs ~15 s, i.e. 3.75 s per pair, as measured here
while other jobs shared the cores: 12-33 s per step in benchmarks/experiments; eval ~1 HH pair/s;
TruthfulQA pairs are ~45 tokens against ~300, assumed ~5x cheaper; process start and model load
~30 s; ~2 samples/s of 48 tokens), one epoch per point:
  hh point         2 x 30 s start + 80 pairs x 3.75 s + 100 dev pairs / 1 + 64 samples / 2 = 492 s
  truthfulqa point 2 x 30 s start + 160 pairs x 0.75 s + 168 dev pairs / 5 + 64 samples / 2 = 246 s
  base evals       (30 + 100 / 1) + (30 + 168 / 10) = 177 s
  total            7 x 492 + 7 x 246 + 177 = 5340 s ~ 89 min   (settings.estimate_seconds, printed at start)
So HH is subsampled hard: its first 80 train pairs (20 steps at batch 4, 10 at batch 8) and 100
dev pairs (a gain needs ~+0.14 for its interval to exclude 0 at n = 100); TruthfulQA: 160
train-side pairs, all 168 dev pairs. On two idle cores (README's measured ~1 s per HH pair,
~1.1 eval pairs/s, ~20 s start) the same settings would take ~45 min; --hh-pairs/--hh-dev/
--tqa-pairs buy more where time allows, and --methods/--datasets split the benchmark over
several sessions (finished points are kept). --quick (8 train and 8 dev pairs, 2 KL prompts x 1
sample x 4 tokens) exists for smoke tests with a tiny random model (`--model DIR`); its numbers
mean nothing.

Issue 39's protocol (flags; with none of them the invocation, its directories and its finished
points are exactly as before):
- --seeds 0,1,2: each point trains once per seed (train.seed; directories <point>/seed<N>/) and
  each eval writes --per-pair outcomes; the row is seeds.combine_seeds of the seeds' rows: mean
  gain ± std (range) and the crossed seeds x pairs bootstrap interval, "tuned" only if the gain
  holds across seeds. The "before" of each pair is the run's reference (the base model, read in
  the same eval), for simpo/orpo (no reference) the base eval's own per-pair file.
- --train-pairs 100,400,1800 --epochs 1,2,3: the learning curve, a point per (pairs, epochs) per
  method and data set (directories n<N>-e<E>/; sizes capped at the training side, TruthfulQA's
  444), train.epochs=E and train.reference_cache=true (reference log-probs computed once, read on
  later epochs and by every seed). Writes learning_curve.json/.png (curves.py) instead of the
  table; with --collect it gathers the finished points and trains nothing.
- --split second: dev = as many pairs as the first split's dev, from the training side. HH: its last
  records (train.jsonl.gz [1800 - hh_dev, 1800), no prompt shared with the records before it for
  hh_dev 100 or 200), training reads only records before them. TruthfulQA: 168 questions drawn by a
  second hash from outside the search's validation slice [160, 276) (the side's last slice would be
  all but one Non-Adversarial: the CSV lists its Adversarial questions first), written to
  <out>/data/truthfulqa-second/, training reads the other records in file order. Either way a
  recipe chosen on the first split is re-measured on pairs nothing was trained or chosen on
  (search.py's validation slice stops at 276). Points under <data>-second/, writes
  results-second.*, compared point by point with the first split's results (--first FILE, default
  results.json beside this script): the gain inside the first interval, the difference of the two
  gains with its interval, and the trained accuracy, since the two dev slices' bases differ.
- --full-train: each recipe on the whole training side under its stated budget (recipe.budget in
  src/preftune/core/recipes/<method>.yaml; the form is protocol.py's docstring: a step or KL
  budget, health checks to stop on, the best validation checkpoint kept with val_pairs carved from
  the end of the training side). A recipe that states none trains on the whole side as it is.
  Points under <method>/full/, writes results-full-train.*. Combines with --split second and --seeds.
- --precision fp32,bf16 (issue 37 item 3): every point trained in fp32 and again with
  train.autocast_bf16=true (the transformer body in bf16, the LM head and log-softmax in fp32),
  both evaluated in fp32; the bf16 points live under <point>/bf16/, the fp32 ones where the
  default puts them (finished ones are reused). Writes results-precision.* (rows "method (fp32)",
  "method (bf16)", a note per pair of rows: gain, KL, flags and training time side by side);
  --precision bf16 alone writes results-bf16.*.
- --judge SOURCE (item 7): each point's eval also samples the policy and the reference on the
  held-out prompts (eval.kl_prompts x eval.kl_samples, the samples the KL already draws) and scores
  both with SOURCE (`preftune eval --reward`): the win rate (policy sample k against reference
  sample k, ties half) with a bootstrap interval over prompts, seeds x prompts for --seeds
  (seeds.combine_win_rates), in a section under the table. SOURCE must be a scorer the points did
  not train against, e.g. a reward model trained on the training side only
  (`preftune train-rm data.train_path=../shared/data/hh-rlhf-harmless-base/train.jsonl.gz
  run.output_dir=runs/judge-hh`, then `--judge rm:runs/judge-hh`) or an ensemble of several. The
  judge is part of each point's eval arguments: finished trainings are reused and only evaluated
  again.
The README table is results.md: run --seeds (with the --hh-pairs/--hh-dev the table used) and then
--collect with the same flags.

Writes results.json (a row per base evaluation and per point; settings; the acceptance checks of
issue 18 computed from the numbers), results.md (the table and notes) and gain_vs_kl.png beside
this file; with --quick into --out instead. A filtered invocation writes only its own rows, so
the committed files come from `--collect` over every method and data set (with the same
--hh-pairs/--hh-dev/--tqa-pairs as the runs): it trains nothing and gathers the finished points,
leaving out the ones not run. TRL at equal steps and equal time (issue 18 item 5) is
`python -m benchmarks.quality.peer_trl` (peer_trl.py beside this file); the per-method search
(item 2) is `python -m benchmarks.quality.search`.

This file is the CLI; the rest sits beside it: settings.py (paths, METHODS, BUILTIN, SETTINGS,
RATES; the TruthfulQA split, newcombe, estimate_seconds), points.py (one `preftune` process per
step, each cached by its settings: run_point, base_eval) and table_rows.py (a finished point's
files into a table row: summarize, seed_row).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from benchmarks.experiments.hh_cli import HH

from .curves import write_curve
from .points import _rel, base_eval, dataset_inputs, recipe_budget, run_point
from .protocol import budget_plan, curve_grid, parse_ints, point_name
from .quality_outputs import acceptance, split_agreement, write_outputs  # noqa: F401 (acceptance: for tests)
from .settings import (
    DATASETS,
    HERE,
    HH_TRAIN_PAIRS,
    METHODS,
    PRECISIONS,
    RATES,
    REFERENCE_FREE,
    ROOT,
    SETTINGS,
    TQA,
    TQA_TRAIN_PAIRS,
    estimate_seconds,
)
from .table_rows import seed_row, summarize


def variants(data: dict, method: str, out: Path, s: dict, protocol: dict) -> list[tuple[dict, tuple, str, dict]]:
    """The points one (data set, method) runs under the flags: (data, extra overrides, directory
    name, fields for the row). Default: the mode's subsample as it is. --train-pairs/--epochs: the
    learning-curve grid, reference cache on. --full-train: the whole training side under the
    recipe's stated budget (protocol.budget_plan), or the recipe as it is if it states none."""
    if protocol["train_pairs"]:
        grid = curve_grid(protocol["train_pairs"], protocol["epochs"], data["side_pairs"])
        return [(dataset_inputs(data["name"], out, s, protocol["split"], pairs=n),
                 (f"train.epochs={e}", "train.reference_cache=true"), point_name(n, e), {"train_pairs": n, "epochs": e})
                for n, e in grid]
    if protocol["full_train"]:
        budget = recipe_budget(method)
        n, extra = budget_plan(budget, data["side_pairs"], data["side"]) if budget else (data["side_pairs"], [])
        full = {**data, "train": f"{data['side']}[:{n}]", "train_pairs": n}
        return [(full, tuple(extra), "full", {"train_pairs": n, "budget": budget, "budget_args": extra})]
    return [(data, (), "", {})]


def _names(text: str, known: tuple, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        sys.exit(f"--{what}: unknown {unknown or 'empty'}; known: {', '.join(known)}")
    return names


def _protocol(a: argparse.Namespace, s: dict, datasets: list[str]) -> dict:
    """Issue 39's flags as one dict (the default invocation: one seed, the first split, the mode's
    subsample); a bad combination exits with one line."""
    try:
        seeds = parse_ints(a.seeds, "seeds") if a.seeds else (0,)
        pairs = parse_ints(a.train_pairs, "train-pairs", minimum=1) if a.train_pairs else ()
        epochs = parse_ints(a.epochs, "epochs", minimum=1) if a.epochs else ()
    except ValueError as e:
        sys.exit(str(e))
    precisions = tuple(dict.fromkeys(p.strip() for p in a.precision.split(",") if p.strip()))
    if not precisions or set(precisions) - set(PRECISIONS):
        sys.exit(f"--precision: {a.precision!r}; give fp32, bf16 or fp32,bf16")
    if (pairs or epochs) and a.full_train:
        sys.exit("--full-train trains on the whole training side: it takes no --train-pairs/--epochs grid")
    if epochs and not pairs:  # epochs alone: the mode's subsample of each data set, several epochs
        pairs = tuple(sorted({s["hh_pairs"] if d == "hh" else s["tqa_pairs"] for d in datasets}))
    return {"seeds": seeds, "several_seeds": len(seeds) > 1, "split": a.split, "full_train": a.full_train,
            "train_pairs": pairs, "epochs": epochs or ((1,) if pairs else ()), "precisions": precisions}


def _suffix(protocol: dict) -> str:
    """The outputs' name suffix: the default table stays results.md; other protocols write beside it."""
    precision = {("fp32",): "", ("bf16",): "-bf16"}.get(protocol["precisions"], "-precision")
    return ("-second" if protocol["split"] == "second" else "") + ("-full-train" if protocol["full_train"] else "") + precision


def _estimate(s: dict, methods: list[str], datasets: list[str], protocol: dict) -> dict:
    """estimate_seconds for the flags: a point's training scales with its pairs x epochs (the
    whole training side under --full-train), and every point runs once per seed."""
    if protocol["train_pairs"]:
        sizes = [(n, e) for n in protocol["train_pairs"] for e in protocol["epochs"]]
    elif not protocol["full_train"] and len(protocol["seeds"]) == 1 and len(protocol["precisions"]) == 1:
        return estimate_seconds(s, methods, datasets)  # the default invocation's estimate, as before
    elif protocol["full_train"]:
        sizes = [(HH_TRAIN_PAIRS, 1)]  # each data set's whole side: capped below for TruthfulQA
    else:
        sizes = [(None, 1)]
    points, base = 0.0, {}
    for n, epochs in sizes:
        sized = s if n is None else {**s, "hh_pairs": n * epochs, "tqa_pairs": min(n, TQA_TRAIN_PAIRS) * epochs}
        e = estimate_seconds(sized, methods, datasets)
        points += sum(e["per_point_s"].values()) * len(methods) * len(protocol["seeds"]) * len(protocol["precisions"])
        base = e["base_eval_s"]
    return {"total_s": round(points + sum(base.values())), "points": len(sizes) * len(methods) * len(datasets),
            "seeds": len(protocol["seeds"]), "rates": RATES}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-test budget; results go to --out, not beside the script")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="start model (a zoo name or a model directory)")
    ap.add_argument("--out", help="working directory (default runs/quality, or runs/quality-quick with --quick)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {','.join(DATASETS)}")
    ap.add_argument("--collect", action="store_true", help="train nothing: write the outputs from the points already "
                    "finished with these settings (the committed table gathers points run by several invocations)")
    for flag, key, what in (("--hh-pairs", "hh_pairs", "HH training pairs (the first N of 1,800)"),
                            ("--hh-dev", "hh_dev", "HH dev pairs (the first N of 200)"),
                            ("--tqa-pairs", "tqa_pairs", "TruthfulQA training pairs (the first N of the train side)"),
                            ("--tqa-dev", "tqa_dev", "TruthfulQA dev pairs (0 = the whole dev side)")):
        ap.add_argument(flag, type=int, dest=key, help=f"{what}; default from the mode")
    ap.add_argument("--seeds", help="training seeds, e.g. 0,1,2: each point once per seed (train.seed), evaluated "
                    "per pair; a row is their mean, spread and seeds x pairs interval (default: seed 0 as before)")
    ap.add_argument("--train-pairs", help="learning curve: training-pair counts, e.g. 100,400,1800 (capped at the "
                    "training side); writes learning_curve.json/.png instead of the table")
    ap.add_argument("--epochs", help="learning curve: epochs, e.g. 1,2,3 (a grid with --train-pairs; reference cache on)")
    ap.add_argument("--split", choices=("first", "second"), default="first", help="second: dev = a dev-sized set from the "
                    "training side (HH: its last records; TruthfulQA: a hash draw), training reads the rest "
                    "(writes results-second.*)")
    ap.add_argument("--first", metavar="FILE", help="with --split second: the first split's results to compare with "
                    "(default: results[-full-train].json beside this script, which a --seeds run may have replaced)")
    ap.add_argument("--full-train", action="store_true", help="train on the whole training side under each recipe's "
                    "stated budget (recipe.budget; writes results-full-train.*)")
    ap.add_argument("--judge", metavar="SOURCE", help="score the policy's and the reference's held-out samples with this "
                    "reward source (e.g. rm:DIR, a reward model trained on the training side; never one the points "
                    "trained against): each point's sampled win rate with its interval over prompts")
    ap.add_argument("--precision", default="fp32", help="fp32 (default), bf16 (train.autocast_bf16=true; writes "
                    "results-bf16.*) or fp32,bf16: every point in both, side by side in results-precision.*")
    a = ap.parse_args(argv)
    methods, datasets = _names(a.methods, METHODS, "methods"), _names(a.datasets, DATASETS, "datasets")
    needed = {"hh": HH / "train.jsonl.gz", "truthfulqa": TQA}
    missing = [str(needed[d]) for d in datasets if not needed[d].is_file()]
    if missing:
        print(f"quality benchmark skipped: the shared data is absent ({missing[0]})")
        return 0
    mode = "quick" if a.quick else "full"
    s = {**SETTINGS[mode], **{k: getattr(a, k) for k in ("hh_pairs", "hh_dev", "tqa_pairs", "tqa_dev", "judge")
                              if getattr(a, k) is not None}}
    protocol = _protocol(a, s, datasets)
    out = (ROOT / (a.out or ("runs/quality-quick" if a.quick else "runs/quality"))).resolve()
    estimate = _estimate(s, methods, datasets, protocol)
    print(f"quality ({mode}): {len(methods)} method(s) x {len(datasets)} data set(s) in {out}; estimated "
          f"{estimate['total_s'] / 60:.0f} min with the default model on this CPU", flush=True)
    t0 = time.perf_counter()
    rows, bases, data_info = _run_all(datasets, methods, out, s, a.model, protocol, a.collect)
    meta = {"mode": mode, "model": a.model, "methods": methods, "datasets": datasets, **s, "data": data_info,
            "estimate": estimate, "elapsed_s": round(time.perf_counter() - t0, 1),
            "out": _rel(out)}
    if protocol != _protocol(ap.parse_args([]), s, datasets):  # only a non-default invocation records the flags
        meta["protocol"] = {k: v for k, v in protocol.items() if k != "several_seeds"}
    dest = out if a.quick else HERE
    suffix = _suffix(protocol)
    first = Path(a.first) if a.first else dest / f"results{suffix.replace('-second', '')}.json"
    if a.first and not first.is_file():
        ap.error(f"--first {a.first}: no such file")
    if protocol["split"] == "second" and first.is_file():  # the same points' first-split figures, if written
        meta["second_split_agreement"] = split_agreement(json.loads(first.read_text()), rows)
    if protocol["train_pairs"]:
        write_curve(dest, rows, meta, suffix=suffix)
        print(f"wrote {_rel(dest / f'learning_curve{suffix}.json')}, learning_curve{suffix}.png", flush=True)
    else:
        write_outputs(dest, rows, bases, meta, suffix=suffix)
        print((dest / f"results{suffix}.md").read_text())
        print(f"wrote {_rel(dest / f'results{suffix}.json')}, results{suffix}.md, gain_vs_kl{suffix}.png", flush=True)
    return 1 if any("error" in r for r in [*rows, *bases.values()]) else 0


def _run_all(datasets: list[str], methods: list[str], out: Path, s: dict, model: str, protocol: dict,
             collect: bool) -> tuple[list[dict], dict, dict]:
    """Every point of the invocation (or with `collect` the finished ones): rows, base rows, data settings."""
    rows, bases, data_info = [], {}, {}
    several = protocol["several_seeds"]
    for name in datasets:
        data = dataset_inputs(name, out, s, protocol["split"])
        data_info[name] = {k: (_rel(v) if k in ("train", "dev") else v) for k, v in data.items()
                           if k not in ("name", "tag", "side", "side_pairs")}  # as before: the split says the rest
        base = base_eval(data, out, s, model, finished_only=collect)
        if base is None:
            print(f"{name}: no finished base evaluation with these settings; skipped (--collect)")
            continue
        bases[name] = base
        base_pairs = base_eval(data, out, s, model, finished_only=collect, per_pair=True) \
            if several and set(methods) & set(REFERENCE_FREE) else None
        for method in methods:
            for (vdata, extra, vname, fields), precision in itertools.product(
                    variants(data, method, out, s, protocol), protocol["precisions"]):
                if precision == "bf16":  # its own directory beside the fp32 point, which stays where it was
                    extra, vname = (*extra, "train.autocast_bf16=true"), "-".join(x for x in (vname, "bf16") if x)
                if protocol["precisions"] != ("fp32",):
                    fields = {**fields, "precision": precision}
                seeds = (None,) if protocol["seeds"] == (0,) else protocol["seeds"]  # None: as before, no seed dir
                points = [run_point(vdata, method, out, s, model, extra, vname, collect, seed) for seed in seeds]
                label = " ".join(x for x in (name, method, vname) if x)
                if any(p is None for p in points):
                    print(f"{label}: not run with these settings; left out (--collect)")
                    continue
                print(f"{label} ...", flush=True)
                row = seed_row(vdata, method, points, base, base_pairs) if several else \
                    summarize(vdata, method, points[0], base)
                if fields or protocol["split"] != "first":  # a default row keeps exactly its old fields
                    row = {**row, **fields, "split": protocol["split"]}
                rows.append(row)
    return rows, bases, data_info


if __name__ == "__main__":
    sys.exit(main())
