"""A finished point's files turned into one row of the quality table: what the run trained with
(its config.yaml), today's health checks replayed over its metrics.jsonl and applied to the eval's
sampled KL and lengths, the gains over the base model with their intervals (summarize), and
several seeds' rows combined over their per-pair outcomes (seed_row). Reads files only."""

from __future__ import annotations

import json
from pathlib import Path

from .seeds import combine_seeds, pair_outcomes
from .settings import REFERENCE_FREE, ROOT, UNPAIRED, newcombe

__all__ = ["SAMPLE_CHECKS", "SAMPLE_CHECK_THRESHOLDS", "eval_flags", "replay_health", "summarize", "seed_row"]


def _resolved(run: Path) -> dict:
    """What the run actually trained with, from its config.yaml."""
    import yaml

    from preftune.core.losses import build_loss

    c = yaml.safe_load((ROOT / run / "config.yaml").read_text())
    spec = build_loss(c["loss"]["name"], c["loss"]["mix"])  # the settings this loss reads, not every loss's
    loss = {"mix" if c["loss"]["mix"] else "name": c["loss"]["mix"] or c["loss"]["name"],
            **{k: c["loss"][k] for k in spec.params},
            **{k: v for k, v in c["loss"].items() if k.startswith("kto_") and spec.kind.data == "unpaired"}}
    return {"loss": loss, "lr": c["train"]["lr"], "batch_size": c["train"]["batch_size"],
            "grad_accum": c["train"]["grad_accum"], "epochs": c["train"]["epochs"], "max_steps": c["train"]["max_steps"],
            "warmup_ratio": c["train"]["warmup_ratio"], "lora_r": c["model"]["lora_r"],
            "lora_target_modules": c["model"]["lora_target_modules"],
            "thresholds": {k: v for k, v in _thresholds(c).items() if k in SAMPLE_CHECK_THRESHOLDS}}


# the probe checks that read sampled KL and lengths: applied to the evaluation's samples as "(eval)"
SAMPLE_CHECKS = ("kl_drift", "length_drift", "length_collapse")
SAMPLE_CHECK_THRESHOLDS = ("kl_max", "length_growth", "length_shrink")


def _thresholds(c: dict) -> dict:
    """The run's health thresholds from its config.yaml; a run trained before a threshold existed
    gets its default."""
    from preftune.core.diagnostics import HEALTH_DEFAULTS

    return {k: c["diagnostics"].get(k, v) for k, v in HEALTH_DEFAULTS.items()}


def eval_flags(e: dict, thresholds: dict) -> list[str]:
    """The registered sample checks (kl_drift, length_drift, length_collapse) on the evaluation's
    KL and sample lengths, as one probe row with the run's thresholds."""
    from preftune.core.diagnostics import health_checks

    probe = {"probe/kl": e.get("kl"), "probe/sample_length": e.get("sample_length/policy/mean"),
             "probe/reference_length": e.get("sample_length/reference/mean")}
    return [f"{name} (eval)" for name in health_checks([probe], beta=1.0, **thresholds) if name in SAMPLE_CHECKS]


def replay_health(run: Path, method: str) -> dict[str, int]:
    """{check: first step} of today's health checks replayed over the run's metrics.jsonl with its
    own beta and thresholds, so that every row is flagged by the same checks whatever code trained
    it. Runs from before `logratios/*` were logged get them back as rewards / beta, which is the
    policy - reference log-ratio for every loss with a reference here (DPO family, KTO)."""
    import yaml

    from preftune.core.diagnostics import health_checks

    c = yaml.safe_load((ROOT / run / "config.yaml").read_text())
    beta, thresholds = c["loss"]["beta"], _thresholds(c)
    rows = [json.loads(x) for x in (ROOT / run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if method not in REFERENCE_FREE:
        for r in rows:
            if "logratios/chosen" not in r and "rewards/chosen" in r:
                r["logratios/chosen"], r["logratios/rejected"] = r["rewards/chosen"] / beta, r["rewards/rejected"] / beta
    first: dict[str, int] = {}
    for i in range(1, len(rows) + 1):
        for name in health_checks(rows[:i], beta=beta, paired=method not in UNPAIRED, **thresholds):
            first.setdefault(name, rows[i - 1].get("step", i))
    return first


def summarize(data: dict, method: str, p: dict, base: dict) -> dict:
    """One row of the table: before, after, gains with intervals, KL, lengths, flags, wall time."""
    row = {"dataset": data["name"], "method": method}
    if "error" in p or "error" in base:
        return {**row, "error": p.get("error") or base["error"], "log": p.get("log") or base.get("log")}
    e = json.loads((ROOT / p["eval_file"]).read_text())
    s = json.loads((ROOT / p["run"] / "summary.json").read_text())
    cfg = _resolved(Path(p["run"]))
    imp, imp_ci, logp, logp_ci = (e["accuracy/implicit_reward"], e["accuracy/implicit_reward_ci95"],
                                  e["accuracy/logp"], e["accuracy/logp_ci95"])
    gain, gain_ci = newcombe(imp, imp_ci, base["logp_acc"], base["logp_acc_ci95"])
    logp_gain, logp_gain_ci = newcombe(logp, logp_ci, base["logp_acc"], base["logp_acc_ci95"])
    paired, interval = e.get("paired") or {}, "independent (Newcombe)"
    if "gain" in paired and "logp_gain" in paired:  # the same pairs before and after: the paired interval
        (gain, gain_ci), (logp_gain, logp_gain_ci) = ((paired[k]["gain"], paired[k]["gain_ci95"])
                                                      for k in ("gain", "logp_gain"))
        interval = f"paired bootstrap over pairs (before: {paired['before']})"
    pol, ref = e.get("sample_length/policy/mean"), e.get("sample_length/reference/mean")
    ratio = pol / ref if pol is not None and ref else None
    recorded = s.get("health") or {}
    replayed = replay_health(Path(p["run"]), method) if (ROOT / p["run"] / "metrics.jsonl").is_file() else recorded
    flags = [f"{name} (step {step})" for name, step in replayed.items()] + eval_flags(e, cfg["thresholds"])
    # the headline fields first: `preftune report --experiment` shows a row's first 14 scalar fields
    row.update({"recipe": p["recipe"]["source"], "before_logp_acc": base["logp_acc"], "implicit_acc": imp,
                "implicit_acc_ci95": imp_ci, "gain": gain, "gain_ci95": gain_ci, "kl": e.get("kl"),
                "length_ratio": ratio, "flags": flags, "wall_s": round(p["train_s"] + p["eval_s"], 1),
                "logp_acc": logp, "logp_acc_ci95": logp_ci, "before_logp_acc_ci95": base["logp_acc_ci95"],
                "logp_gain": logp_gain, "logp_gain_ci95": logp_gain_ci, "margin": e["rewards/margins"],
                "kl_stderr": e.get("kl_stderr"), "kl_samples": e.get("kl_samples"),
                "sample_length_policy": pol, "sample_length_reference": ref, "train_s": p["train_s"],
                "eval_s": p["eval_s"], "steps": s["steps"], "train_examples": s["data"]["pairs"],
                "train_unit": "examples (each pair's two sides)" if method in UNPAIRED else "pairs",
                "train_truncated": s["data"]["truncated"], "dev_pairs": e["pairs"], "dev_truncated": e["data_stats"]["truncated"],
                "stopped_early": s.get("stopped_early"), "final_train_loss": (s.get("final") or {}).get("loss"),
                "health_recorded_by_run": recorded, "gain_interval": interval})
    if "win_rate" in e:  # --judge: the policy's samples against the reference's, scored by a source training did not use
        row.update({"win_rate": e["win_rate"], "win_rate_ci95": e.get("win_rate/ci95"), "judge": e["reward/source"],
                    "win_comparisons": e["win_rate/comparisons"], "win_by_prompt": [q.get("win") for q in e["per_prompt"]],
                    "reward_policy": e["reward/policy"], "reward_reference": e["reward/reference"]})
    if s.get("best"):  # train.keep_best (a --full-train budget): the probe the run ended at
        row["best_checkpoint"] = s["best"]
    if "gain" in paired:
        row.update({"gain_mcnemar_p": paired["gain"]["mcnemar_p"], "logp_gain_mcnemar_p": paired["logp_gain"]["mcnemar_p"]})
    if method in REFERENCE_FREE:  # their reward's own starting point: the base model's mean-log-prob accuracy
        own, own_ci = newcombe(imp, imp_ci, base["mean_logp_acc"], base["mean_logp_acc_ci95"])
        row.update({"before_mean_logp_acc": base["mean_logp_acc"], "gain_over_own_start": own,
                    "gain_over_own_start_ci95": own_ci})
    row.update({"trained_with": {k: v for k, v in cfg.items() if k != "thresholds"}, "health_thresholds": cfg["thresholds"],
                "recipe_detail": p["recipe"], "run": p["run"], "eval_file": p["eval_file"]})
    return row


def seed_row(data: dict, method: str, points: list[dict], base: dict, base_pairs: dict | None) -> dict:
    """One table row from a point trained with several seeds: each seed's `summarize` row combined
    over its per-pair outcomes (seeds.combine_seeds: mean, spread, the seeds x pairs interval). The
    "before" of each pair is the run's reference (the base model), or for simpo/orpo, which have
    none, the base eval's per-pair file (`base_pairs`)."""
    from preftune.apps.eval import read_per_pair

    rows = [{**summarize(data, method, p, base), "seed": p.get("seed")} for p in points]
    failed = next((r for r in rows if "error" in r), None)
    if failed is not None:
        return failed
    if method in REFERENCE_FREE and (base_pairs is None or "error" in base_pairs):
        return {"dataset": data["name"], "method": method, "error": "no per-pair base eval for a reference-free method",
                "log": (base_pairs or {}).get("log")}
    before = read_per_pair(str(ROOT / base_pairs["per_pair_file"])) if method in REFERENCE_FREE else None
    outcomes = [pair_outcomes(read_per_pair(str(ROOT / p["per_pair_file"])), before) for p in points]
    return combine_seeds(rows, outcomes)
