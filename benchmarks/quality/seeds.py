"""The quality benchmark's statistics over pairs and seeds (issue 39 items 1-2): each point's per-pair
outcomes from `preftune eval --per-pair`, several training seeds of one point combined into one
table row (mean, spread, the seeds-x-pairs interval of the mean gain, "tuned only if it holds
across seeds"), and the row's gain cell. Pure: files in, numbers out; nothing here trains.

Running the seeds is the runner's part (a point per `train.seed`, each evaluated with --per-pair);
`combine_seeds` takes what those runs leave."""

from __future__ import annotations

import math

from preftune.core.stats import crossed_bootstrap, holds_across_seeds, seed_spread

__all__ = ["pair_outcomes", "combine_seeds", "combine_win_rates", "gain_cell"]


def pair_outcomes(rows: list[dict], base: list[dict] | None = None) -> dict[str, tuple[list, list]]:
    """{"gain": (before, after), "logp_gain": (before, after)} outcome lists from one point's
    per-pair rows, in (line, pair) order. After: the run's implicit-reward and log-prob outcomes.
    Before: the base model's log-prob outcome, from the base eval's per-pair rows (`base`,
    matched by line and pair key; what reference-free methods need) or else the run's reference
    (the same model, read in the run's eval)."""
    rows = sorted(rows, key=lambda r: (r["line"], r["pair"]))
    if base is None:
        if any(r["reference_logp_correct"] is None for r in rows):
            raise ValueError("these per-pair rows have no reference outcome (a reference-free loss): give the base "
                             "eval's per-pair rows")
        before = [r["reference_logp_correct"] for r in rows]
    else:
        index = {(b["line"], b["pair"]): b["logp_correct"] for b in base}
        missing = [r["line"] for r in rows if (r["line"], r["pair"]) not in index]
        if missing:
            raise ValueError(f"{len(missing)} evaluated pair(s) are not in the base eval (e.g. line {missing[0]})")
        before = [index[r["line"], r["pair"]] for r in rows]
    return {"gain": (before, [r["implicit_correct"] for r in rows]),
            "logp_gain": (before, [r["logp_correct"] for r in rows])}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


def combine_seeds(rows: list[dict], outcomes: list[dict]) -> dict:
    """One table row for a point trained with several seeds: `rows[s]` is seed s's `summarize`
    row, `outcomes[s]` its `pair_outcomes` (every seed on the same dev pairs). The gain and the
    log-prob gain become the mean over seeds with `seed_spread`'s interval (seeds and pairs
    resampled, the pairs shared) and spread; accuracies, margin, KL and lengths the mean over
    seeds (`kl_max`: the largest, which the KL acceptance check reads); flags the union, each
    with the seeds that raised it; `tuned`: `holds_across_seeds`."""
    if len(rows) != len(outcomes) or not rows:
        raise ValueError("one row and one set of outcomes per seed")
    gain, logp = (seed_spread([o[key] for o in outcomes]) for key in ("gain", "logp_gain"))
    verdict = holds_across_seeds(gain)
    flags: dict[str, list] = {}
    for r in rows:
        for f in r["flags"]:
            flags.setdefault(f, []).append(r.get("seed", "?"))
    row = dict(rows[0])
    row.update({"implicit_acc": _mean([r["implicit_acc"] for r in rows]),
                "implicit_acc_range": [min(r["implicit_acc"] for r in rows), max(r["implicit_acc"] for r in rows)],
                "gain": gain["mean"], "gain_ci95": gain["ci95"], "gain_interval": "seeds x pairs bootstrap",
                "gain_spread": {k: gain[k] for k in ("std", "min", "max")},
                "per_seed_gains": [g["gain"] for g in gain["per_seed"]],
                "per_seed_mcnemar_p": [g["mcnemar_p"] for g in gain["per_seed"]],
                "logp_acc": _mean([r["logp_acc"] for r in rows]), "logp_gain": logp["mean"], "logp_gain_ci95": logp["ci95"],
                "margin": _mean([r["margin"] for r in rows]), "kl": _mean([r["kl"] for r in rows]),
                "kl_max": max((r["kl"] for r in rows if r["kl"] is not None), default=None),
                "kl_stderr": _mean([r["kl_stderr"] for r in rows]), "length_ratio": _mean([r["length_ratio"] for r in rows]),
                "sample_length_policy": _mean([r["sample_length_policy"] for r in rows]),
                "sample_length_reference": _mean([r["sample_length_reference"] for r in rows]),
                "flags": [f"{f} (seed {', '.join(map(str, s))})" for f, s in flags.items()],
                "wall_s": math.fsum(r["wall_s"] for r in rows), "seeds": len(rows),
                "seed_values": [r.get("seed") for r in rows], "tuned": verdict["tuned"], "tuned_failed": verdict["failed"]})
    if all("train_s" in r for r in rows):  # the seeds' training time together (bf16 against fp32)
        row["train_s"] = math.fsum(r["train_s"] for r in rows)
    if rows and all(r.get("win_by_prompt") for r in rows):
        row.update(combine_win_rates(rows))
    return row


def combine_win_rates(rows: list[dict]) -> dict:
    """The sampled win rate of several seeds judged on the same prompts (--judge): the mean over
    seeds of each seed's win rate, and an interval of the mean over seeds and prompts
    (`crossed_bootstrap` of the per-prompt win fractions, the prompts shared by every seed, as
    the pairs are for the gain); a prompt without a finite judgement in some seed is left out of
    the interval (`win_prompts` says how many count)."""
    by_prompt = [r["win_by_prompt"] for r in rows]
    if len({len(b) for b in by_prompt}) != 1:
        raise ValueError("every seed's win rate must be judged on the same prompts")
    kept = [i for i in range(len(by_prompt[0])) if all(b[i] is not None and math.isfinite(b[i]) for b in by_prompt)]
    rates = [r["win_rate"] for r in rows]
    return {"win_rate": math.fsum(rates) / len(rates), "per_seed_win_rates": rates, "win_prompts": len(kept),
            "win_rate_ci95": crossed_bootstrap([[b[i] for i in kept] for b in by_prompt]) if kept else None,
            "win_rate_interval": "seeds x prompts bootstrap"}


def gain_cell(r: dict) -> str:
    """The table's gain cell: one seed `+0.200 [+0.064, +0.326]`; several `+0.100 ± 0.040 (+0.060
    to +0.140, 3 seeds) [+0.040, +0.160]`: mean ± std, the seeds' range, then the interval."""
    lo, hi = r["gain_ci95"]
    if r.get("seeds", 1) < 2:
        return f"{r['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    s = r["gain_spread"]
    return (f"{r['gain']:+.3f} ± {s['std']:.3f} ({s['min']:+.3f} to {s['max']:+.3f}, {r['seeds']} seeds) "
            f"[{lo:+.3f}, {hi:+.3f}]")
