"""Issue 39's protocol over the quality benchmark's points, the pure parts: the flags' lists, the
second split's slice, the learning-curve grid, and a recipe's stated budget turned into the
overrides of a run on the whole training side. The runner (__main__.py) runs what these describe.

A recipe's budget (`recipe.budget` in src/preftune/core/recipes/<method>.yaml: metadata, so
`preftune train -c recipe:NAME` does not apply it and the benchmark's subsample points do not
either; `python -m benchmarks.quality --full-train` does) says how much optimisation the recipe
wants in a form that does not grow with the data, any of:

    budget:
      max_steps: 60                            # a step budget: at most this many optimizer steps
      epochs: 1                                # passes over the whole file (default: the recipe's)
      kl_max: 10.0                             # a KL budget: kl_drift fires above this sampled KL
      stop_on: [kl_drift, both_logps_falling]  # health checks that end training early
      probe_every: 10                          # probe every N steps: validation accuracy, sampled KL
      keep_best: true                          # end at the probe with the best validation accuracy
      val_pairs: 64                            # validation pairs from the END of the training side

The validation pairs are the last `val_pairs` of the training side (before the second split's
dev slice, when there is one): the run trains on the pairs before them and never sees dev.
"""

from __future__ import annotations

import json

__all__ = ["BUDGET_KEYS", "PROBE_CHECKS", "parse_ints", "second_split", "curve_grid", "point_name", "budget_plan"]

# budget key -> (the setting it becomes, what it means)
BUDGET_KEYS = {
    "max_steps": ("train.max_steps", "step budget: at most this many optimizer steps, whatever the data size"),
    "epochs": ("train.epochs", "passes over the whole training side (default: the recipe's train.epochs)"),
    "kl_max": ("diagnostics.kl_max", "KL budget: kl_drift fires when a probe's sampled KL exceeds this (nats)"),
    "stop_on": ("diagnostics.stop_on", "health checks that end training early"),
    "probe_every": ("diagnostics.probe_every", "probe every N steps (validation accuracy, sampled KL, lengths)"),
    "keep_best": ("train.keep_best", "end at the probe with the best validation accuracy, its weights restored"),
    "val_pairs": ("data.eval_path", "validation pairs carved from the end of the training side (never dev)"),
}
# checks that read probe rows: stopping on them needs probes (and eval_regressing validation pairs)
PROBE_CHECKS = ("kl_drift", "length_drift", "length_collapse", "eval_regressing")


def parse_ints(text: str, what: str, *, minimum: int = 0) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2): distinct integers >= minimum, in the order given."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated integers, got {text!r}") from None
    if not values or len(set(values)) != len(values) or min(values) < minimum:
        raise ValueError(f"--{what}: expected distinct integers >= {minimum}, got {text!r}")
    return values


def second_split(side_pairs: int, dev_pairs: int) -> tuple[int, int]:
    """(start, stop) of the training-side records that become the second split's dev pairs: the
    last `dev_pairs` of the side, as many as the first split's dev. Training then reads only
    records before `start`, so the two are disjoint whatever the number of training pairs."""
    if not 0 < dev_pairs < side_pairs:
        raise ValueError(f"the second split needs 0 < dev pairs ({dev_pairs}) < training-side pairs ({side_pairs})")
    return side_pairs - dev_pairs, side_pairs


def curve_grid(train_pairs: tuple[int, ...], epochs: tuple[int, ...], available: int) -> list[tuple[int, int]]:
    """The learning curve's (training pairs, epochs) points: each size capped at what the training
    side holds (TruthfulQA's 444 for a requested 1,800), sizes that cap to one value run once."""
    sizes = sorted({min(n, available) for n in train_pairs})
    return [(n, e) for n in sizes for e in sorted(epochs)]


def point_name(train_pairs: int, epochs: int) -> str:
    return f"n{train_pairs}-e{epochs}"


def budget_plan(budget: dict, side_pairs: int, side: str) -> tuple[int, list[str]]:
    """A recipe's budget on the whole training side `side` (a file, `side_pairs` records usable):
    (training pairs, `preftune train` overrides). The training pairs are the side less the
    validation slice at its end; the overrides come after the benchmark's fixed ones and win."""
    unknown = sorted(set(budget) - set(BUDGET_KEYS))
    if unknown:
        raise ValueError(f"recipe budget: unknown key(s) {unknown}; known: {', '.join(BUDGET_KEYS)}")
    stop_on, val = list(budget.get("stop_on") or []), int(budget.get("val_pairs") or 0)
    probes = int(budget.get("probe_every") or 0)
    if budget.get("keep_best") and not (val and probes):
        raise ValueError("recipe budget: keep_best needs val_pairs > 0 and probe_every > 0")
    if set(stop_on) & set(PROBE_CHECKS) and not probes:
        raise ValueError(f"recipe budget: stop_on {stop_on} reads probes: set probe_every > 0")
    if "eval_regressing" in stop_on and not val:
        raise ValueError("recipe budget: eval_regressing needs val_pairs > 0")
    if not 0 <= val < side_pairs:
        raise ValueError(f"recipe budget: val_pairs {val} must leave training pairs (side holds {side_pairs})")
    n = side_pairs - val
    args = [f"{BUDGET_KEYS[k][0]}={json.dumps(budget[k])}" for k in ("max_steps", "epochs", "kl_max", "probe_every")
            if k in budget]
    if stop_on:
        args.append(f"diagnostics.stop_on={json.dumps(stop_on)}")
    if budget.get("keep_best"):
        args.append("train.keep_best=true")
    if val:
        args += [f"data.eval_path={side}[{n}:{side_pairs}]", f"diagnostics.probe_eval_pairs={val}"]
    return n, args
