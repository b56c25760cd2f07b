"""`preftune sweep`: a grid over beta x learning rate (x warmup), each point trained and evaluated.

Each point is an ordinary run under `<run.output_dir>/beta<b>-lr<lr>-w<w>/` (config, metrics,
model, eval.json), so a point can be reported or resumed on its own; a point whose eval.json
exists is not trained again. The results table is written as results.jsonl and results.md; the
CLI adds the KL-vs-beta and reward-vs-KL plots (report.plot_sweep).
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

from ..apps.eval import run_eval
from ..training.train import train
from ..utils.safeio import atomic_write, read_json, write_json

__all__ = ["run_sweep", "results_table"]


def _point_dir(root: Path, beta: float, lr: float, warmup: float) -> Path:
    return root / f"beta{beta:g}-lr{lr:g}-w{warmup:g}"


def run_sweep(cfg, *, betas: list[float], lrs: list[float], warmups: list[float] | None = None,
              reward: str | None = None) -> list[dict]:
    """Train and evaluate every grid point; returns one result row per point."""
    root = Path(cfg.run.output_dir)
    held_out = cfg.data.eval_path or cfg.data.train_path
    rows = []
    for beta, lr, warmup in itertools.product(betas, lrs, warmups or [cfg.train.warmup_ratio]):
        point = copy.deepcopy(cfg)
        point.loss.beta, point.train.lr, point.train.warmup_ratio = beta, lr, warmup
        run_dir = _point_dir(root, beta, lr, warmup)
        point.run.output_dir, point.run.overwrite = str(run_dir), True
        eval_file = run_dir / "eval.json"
        if eval_file.is_file():
            ev = read_json(eval_file)
            print(f"sweep: {run_dir.name} done before, kept")
        else:
            print(f"sweep: training {run_dir.name}", flush=True)
            train(point)
            ev = run_eval(point, run_dir=str(run_dir), data_path=held_out, reward=reward)
            write_json(ev, str(eval_file))
        summary = read_json(run_dir / "summary.json")
        rows.append({"run": run_dir.name, "beta": beta, "lr": lr, "warmup": warmup,
                     "accuracy": ev.get("accuracy/implicit_reward"), "margin": ev.get("rewards/margins"),
                     "kl": ev.get("kl"), "reward": ev.get("reward/policy", ev.get("rewards/margins")),
                     "reward_source": ev.get("reward/source", "held-out implicit reward margin"),
                     "win_rate": ev.get("win_rate"), "final_loss": (summary.get("final") or {}).get("loss"),
                     "health": sorted(summary.get("health") or {})})
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write(root / "results.md", results_table(rows) + "\n")
    return rows


def results_table(rows: list[dict]) -> str:
    cols = ["run", "beta", "lr", "warmup", "accuracy", "margin", "kl", "reward", "win_rate", "final_loss", "health"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ",".join(v) if isinstance(v, list) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
