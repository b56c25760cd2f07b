"""What the quality benchmark fixes, and its pure parts: paths, the methods and data sets, the
built-in recipes (BUILTIN), the modes' sizes (SETTINGS) and the per-unit rates (RATES) of the
estimate; the TruthfulQA split, Newcombe's interval and the wall-clock estimate. No process, no
model: the runner (__main__.py) and its siblings (points.py, rows.py, search.py, peer_trl.py)
read these. __main__.py's docstring says why each value is what it is."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
from pathlib import Path

__all__ = ["HERE", "ROOT", "TQA", "RECIPES", "METHODS", "DATASETS", "DEV_PERCENT", "REFERENCE_FREE", "PRECISIONS",
           "UNPAIRED", "BUILTIN", "SETTINGS", "RATES", "TQA_DEV_PAIRS", "TQA_TRAIN_PAIRS", "HH_TRAIN_PAIRS",
           "question_key", "is_dev_question", "split_truthfulqa", "newcombe", "estimate_seconds"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TQA = ROOT.parent / "shared" / "data" / "truthfulqa" / "TruthfulQA.visible.csv"
RECIPES = ROOT / "src" / "preftune" / "core" / "recipes"
METHODS = ("sigmoid", "ipo", "cdpo", "simpo", "orpo", "kto", "rpo")
DATASETS = ("hh", "truthfulqa")
DEV_PERCENT = 30  # TruthfulQA questions held out (see the docstring for why not 20)
REFERENCE_FREE = ("simpo", "orpo")  # their implicit reward is beta * mean log-prob of the policy alone
PRECISIONS = ("fp32", "bf16")  # --precision: bf16 is train.autocast_bf16 (the LM head stays fp32); eval is fp32
UNPAIRED = ("kto",)  # trains on examples: each pair split in two, twice the examples per step
# Built-in per-method settings, used where src/preftune/core/recipes/<method>.yaml does not exist: common
# choices, not tuned on this data (LoRA lr 5e-4 as the demo and hh_cli; beta 0.1 except SimPO's 2 with
# gamma 1, the paper's gamma/beta = 0.5; cDPO eps 0.1; RPO's SFT weight as in README), one epoch of
# 4 pairs per step (KTO: 8 examples, the two sides of 4 pairs).
_EPOCH = {"train.batch_size": 4, "train.epochs": 1, "train.lr": 5e-4}
BUILTIN = {
    "sigmoid": {"loss.name": "sigmoid", "loss.beta": 0.1, **_EPOCH},
    "ipo": {"loss.name": "ipo", "loss.beta": 0.1, **_EPOCH},
    "cdpo": {"loss.name": "cdpo", "loss.beta": 0.1, "loss.label_smoothing": 0.1, **_EPOCH},
    "simpo": {"loss.name": "simpo", "loss.beta": 2.0, "loss.simpo_gamma": 1.0, **_EPOCH},
    "orpo": {"loss.name": "orpo", "loss.beta": 0.1, **_EPOCH},
    "kto": {"loss.name": "kto", "loss.beta": 0.1, "loss.kto_auto_weights": True, **_EPOCH, "train.batch_size": 8},
    "rpo": {"loss.mix": [["sigmoid", 1.0], ["sft", 0.2]], "loss.beta": 0.1, **_EPOCH},
}
SETTINGS = {
    "full": {"hh_pairs": 80, "hh_dev": 100, "tqa_pairs": 160, "tqa_dev": 0, "kl_prompts": 16, "kl_samples": 2,
             "max_new_tokens": 48},
    "quick": {"hh_pairs": 8, "hh_dev": 8, "tqa_pairs": 8, "tqa_dev": 8, "kl_prompts": 2, "kl_samples": 1,
              "max_new_tokens": 4},
}
# seconds per unit on this CPU (see the docstring); only for the printed estimate
RATES = {"start_s": 30.0, "hh_pair_s": 3.75, "hh_eval_pairs_per_s": 1.0, "hh_base_pairs_per_s": 1.0,
         "tqa_pair_s": 0.75, "tqa_eval_pairs_per_s": 5.0, "tqa_base_pairs_per_s": 10.0, "samples_per_s": 2.0}
TQA_DEV_PAIRS = 168  # what the split gives (checked by the test); for the estimate only
TQA_TRAIN_PAIRS, HH_TRAIN_PAIRS = 444, 1800  # the training sides' sizes, likewise for the estimate only


# ---- pure parts: split, intervals, estimate --------------------------------------------------

def question_key(question: str) -> str:
    return " ".join(question.lower().split())


def is_dev_question(question: str, dev_percent: int = DEV_PERCENT) -> bool:
    """A fixed, order-free split: the question's normalised text hashed (sha256), mod 100."""
    return int(hashlib.sha256(question_key(question).encode()).hexdigest()[:12], 16) % 100 < dev_percent


def split_truthfulqa(csv_path: Path, dest: Path, dev_percent: int = DEV_PERCENT) -> dict:
    """Write the CSV's rows to dest/train.jsonl and dest/dev.jsonl by question; no question on both sides."""
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    sides = {"train": [], "dev": []}
    for row in rows:
        sides["dev" if is_dev_question(row["Question"], dev_percent) else "train"].append(row)
    shared = {question_key(r["Question"]) for r in sides["train"]} & {question_key(r["Question"]) for r in sides["dev"]}
    if shared:  # cannot happen with a hash of the same key; checked because the benchmark's claim rests on it
        sys.exit(f"TruthfulQA split: {len(shared)} question(s) on both sides, e.g. {sorted(shared)[0]!r}")
    dest.mkdir(parents=True, exist_ok=True)
    texts = {side: "".join(json.dumps(r) + "\n" for r in part) for side, part in sides.items()}
    for side, text in texts.items():
        (dest / f"{side}.jsonl").write_text(text)
    return {"questions": len(rows), "train": len(sides["train"]), "dev": len(sides["dev"]),
            "questions_on_both_sides": 0, "rule": f"sha256(normalised question) mod 100 < {dev_percent} -> dev",
            # what a finished point was measured on: a changed split or CSV redoes the points
            "sha256": {side: hashlib.sha256(text.encode()).hexdigest() for side, text in texts.items()}}


def second_split_truthfulqa(side: Path, dest: Path, dev_pairs: int, keep_out: tuple[int, int]) -> dict:
    """TruthfulQA's second split, written to dest/train.jsonl and dest/dev.jsonl: dev = `dev_pairs`
    training-side questions drawn by a second hash of the question (unrelated to the first split's
    draw), outside the records [keep_out) that a recipe search validates on; training reads the
    rest of the side in file order. Not a slice from the end of the side: the CSV lists its
    Adversarial questions first, so the last 168 of the side are all but one Non-Adversarial (the
    base model is right on 0.50 of them against 0.33 of the first dev set, a mix like this one)."""
    rows = [json.loads(line) for line in side.read_text(encoding="utf-8").splitlines() if line.strip()]
    lo, hi = keep_out
    outside = [i for i in range(len(rows)) if not lo <= i < hi]
    if not 0 < dev_pairs < len(outside):
        raise ValueError(f"the second split needs 0 < dev pairs ({dev_pairs}) < records outside [{lo}, {hi}) "
                         f"({len(outside)})")
    draw = sorted(outside, key=lambda i: hashlib.sha256(f"second:{question_key(rows[i]['Question'])}".encode()).hexdigest())
    dev = set(draw[:dev_pairs])
    texts = {"train": "".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if i not in dev),
             "dev": "".join(json.dumps(rows[i]) + "\n" for i in sorted(dev))}
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (dest / f"{name}.jsonl").write_text(text)
    return {"train": len(rows) - dev_pairs, "dev": dev_pairs,
            "rule": f"dev = the {dev_pairs} training-side questions outside records [{lo}, {hi}) with the lowest "
                    "sha256('second:' + normalised question); training reads the others in file order",
            "sha256": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in texts.items()}}


def newcombe(p1: float, ci1: list, p2: float, ci2: list) -> tuple[float, list[float]]:
    """p1 - p2 and Newcombe's hybrid score 95% interval (independent proportions) from their Wilson intervals."""
    (l1, u1), (l2, u2) = ci1, ci2
    d = p1 - p2
    return d, [d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)]


def estimate_seconds(s: dict, methods: list[str], datasets: list[str], rates: dict = RATES) -> dict:
    """Wall-clock estimate of a configuration from per-unit rates (the docstring's arithmetic),
    assuming one epoch over each training subsample, as every recipe runs today."""
    r, samples = rates, 2 * s["kl_prompts"] * s["kl_samples"]  # policy and reference samples per eval
    tqa_dev = s["tqa_dev"] or TQA_DEV_PAIRS
    point = {"hh": 2 * r["start_s"] + s["hh_pairs"] * r["hh_pair_s"] + s["hh_dev"] / r["hh_eval_pairs_per_s"]
             + samples / r["samples_per_s"],
             "truthfulqa": 2 * r["start_s"] + s["tqa_pairs"] * r["tqa_pair_s"] + tqa_dev / r["tqa_eval_pairs_per_s"]
             + samples / r["samples_per_s"]}
    base = {"hh": r["start_s"] + s["hh_dev"] / r["hh_base_pairs_per_s"],
            "truthfulqa": r["start_s"] + tqa_dev / r["tqa_base_pairs_per_s"]}
    total = sum(len(methods) * point[d] + base[d] for d in datasets)
    return {"per_point_s": {d: round(point[d]) for d in datasets}, "base_eval_s": {d: round(base[d]) for d in datasets},
            "total_s": round(total), "rates": rates}
