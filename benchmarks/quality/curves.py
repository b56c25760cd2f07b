"""Learning curves of the quality benchmark (issue 39 item 3): gain against training pairs, a line
per method x epochs and a panel per data set, from the rows of points already run.

    PYTHONPATH=src python -m benchmarks.quality --datasets hh --train-pairs 100,400,1800 --epochs 1,2,3 --seeds 0,1,2
    PYTHONPATH=src python -m benchmarks.quality --datasets hh --train-pairs 100,400,1800 --epochs 1,2,3 --seeds 0,1,2 --collect

The second command trains nothing: it gathers the finished points into learning_curve.json and
learning_curve.png (error bars: the row's interval, seeds x pairs with several seeds, else the
paired or Newcombe interval the row carries). Each line says where its gain saturates: the
fewest training pairs whose gain reaches the lower end of the largest size's interval (more data
past it is not shown to help); and what each point cost (wall seconds per seed, sampled KL).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .quality_outputs import COLORS

__all__ = ["curve_lines", "saturates_at", "write_curve"]

STYLES = {1: "-", 2: "--", 3: ":"}


def saturates_at(points: list[dict]) -> int | None:
    """The fewest training pairs whose gain is at least the lower end of the interval of the gain
    at the most pairs; None with fewer than two sizes (nothing to compare)."""
    if len(points) < 2:
        return None
    floor = max(points, key=lambda p: p["train_pairs"])["gain_ci95"][0]
    return min(p["train_pairs"] for p in points if p["gain"] >= floor)


def _point(r: dict) -> dict:
    seeds = r.get("seeds", 1)
    return {"train_pairs": r["train_pairs"], "gain": r["gain"], "gain_ci95": r["gain_ci95"],
            "gain_interval": r.get("gain_interval"), "implicit_acc": r["implicit_acc"],
            "before_logp_acc": r["before_logp_acc"], "kl": r["kl"], "kl_max": r.get("kl_max", r["kl"]),
            "flags": r["flags"], "seeds": seeds, "wall_s_per_seed": round(r["wall_s"] / seeds, 1), "steps": r["steps"]}


def curve_lines(rows: list[dict]) -> dict:
    """{"lines": one per (data set, method, epochs) with its points by training pairs and where it
    saturates, "errors": the rows that failed}."""
    lines: dict[tuple, list] = {}
    for r in (r for r in rows if "error" not in r):
        lines.setdefault((r["dataset"], r["method"], r["epochs"]), []).append(_point(r))
    out = []
    for (dataset, method, epochs), points in lines.items():
        points.sort(key=lambda p: p["train_pairs"])
        out.append({"dataset": dataset, "method": method, "epochs": epochs, "points": points,
                    "saturates_at": saturates_at(points)})
    errors = [{k: r.get(k) for k in ("dataset", "method", "train_pairs", "epochs", "error", "log")}
              for r in rows if "error" in r]
    return {"lines": out, "errors": errors}


def plot_curve(curve: dict, dest: Path, title: str) -> None:
    """Gain (interval as error bars) against training pairs on a log axis, a panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(line["dataset"] for line in curve["lines"])) or ["(no points)"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for line in (x for x in curve["lines"] if x["dataset"] == dataset):
            p = line["points"]
            ns, gains = [q["train_pairs"] for q in p], [q["gain"] for q in p]
            err = [[q["gain"] - q["gain_ci95"][0] for q in p], [q["gain_ci95"][1] - q["gain"] for q in p]]
            ax.errorbar(ns, gains, yerr=err, color=COLORS.get(line["method"], "k"), ls=STYLES.get(line["epochs"], "-."),
                        marker="o", ms=4, capsize=3, label=f"{line['method']}, {line['epochs']} epoch(s)")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.axhline(0.08, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set(xlabel="training pairs", ylabel="implicit acc after - log-prob acc before (95% CI)", title=dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)


def write_curve(dest: Path, rows: list[dict], meta: dict, suffix: str = "") -> dict:
    """learning_curve.json (lines, errors, settings) and learning_curve.png in `dest` (`suffix`:
    another protocol's, e.g. learning_curve-second.json for the second split)."""
    curve = {"command": " ".join(["python -m benchmarks.quality", *sys.argv[1:]]), **curve_lines(rows),
             "saturation": "the fewest training pairs whose gain reaches the lower end of the largest size's interval",
             "settings": meta}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"learning_curve{suffix}.json").write_text(json.dumps(curve, indent=1, default=str) + "\n")
    plot_curve(curve, dest / f"learning_curve{suffix}.png",
               f"gain vs training pairs ({meta['mode']}{suffix}, {Path(meta['model']).name})")
    return curve
