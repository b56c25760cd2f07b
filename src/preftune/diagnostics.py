"""Standard per-step metrics, as pure functions of tensors already computed by the loop.

Keys follow the DPO reference / TRL names so dashboards carry over.
"""

from __future__ import annotations

import math

import torch

__all__ = ["step_metrics", "health_checks", "HEALTH_DEFAULTS", "CHECKS"]


def _mean(x: torch.Tensor) -> float:
    return x.float().mean().item() if x.numel() else float("nan")


def step_metrics(parts: dict[str, torch.Tensor], *, paired: bool) -> dict[str, float]:
    """`parts` holds per-example tensors gathered over one optimizer step (see train.loss_forward).

    Paired: rewards/accuracies is the fraction of pairs with a positive margin. Unpaired (KTO):
    rewards/chosen and rewards/rejected average over desirable and undesirable examples, and
    the margin is their difference. Loss-specific extras (e.g. `kl`, `orpo/log_odds_ratio`)
    are averaged under their own names.
    """
    if paired:
        margins = parts["chosen_rewards"] - parts["rejected_rewards"]
        row = {
            "loss": _mean(parts["losses"]),
            "rewards/chosen": _mean(parts["chosen_rewards"]),
            "rewards/rejected": _mean(parts["rejected_rewards"]),
            "rewards/margins": _mean(margins),
            "rewards/accuracies": _mean(margins > 0),
            "logps/chosen": _mean(parts["policy_chosen"]),
            "logps/rejected": _mean(parts["policy_rejected"]),
            "lengths/chosen": _mean(parts["chosen_lengths"]),
            "lengths/rejected": _mean(parts["rejected_lengths"]),
        }
        standard = {"losses", "chosen_rewards", "rejected_rewards", "policy_chosen", "policy_rejected",
                    "chosen_lengths", "rejected_lengths"}
    else:
        good = parts["labels"].bool()
        chosen, rejected = _mean(parts["rewards"][good]), _mean(parts["rewards"][~good])
        row = {
            "loss": _mean(parts["losses"]),
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "logps/chosen": _mean(parts["policy"][good]),
            "logps/rejected": _mean(parts["policy"][~good]),
            "lengths/chosen": _mean(parts["lengths"][good]),
            "lengths/rejected": _mean(parts["lengths"][~good]),
            "examples/desirable": int(good.sum()),
            "examples/undesirable": int((~good).sum()),
        }
        standard = {"losses", "rewards", "labels", "policy", "lengths"}
    row.update({k: _mean(v) for k, v in parts.items() if k not in standard})
    return row


# ---- health checks: named, pure functions over the metric history -----------------------

CHECKS = ("nonfinite", "margin_explosion", "both_logps_falling", "margin_stuck", "accuracy_saturated",
          "kl_drift", "length_drift", "eval_regressing")

# the same defaults as config.DiagnosticsConfig (a test keeps them equal)
HEALTH_DEFAULTS = {
    "margin_explosion_nats": 50.0,
    "logp_fall_nats": 5.0,
    "window": 10,
    "kl_max": 10.0,
    "length_growth": 1.5,
    "eval_drop": 0.05,
}


def _window_mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return sum(values) / len(values) if values else float("nan")


def _probed(history: list[dict], key: str) -> list[float]:
    """The finite values of a key that only probe steps carry, oldest first."""
    return [r[key] for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def health_checks(history: list[dict], *, beta: float, paired: bool = True, **thresholds) -> list[str]:
    """Names of the unhealthy patterns the history shows at its last step.

    nonfinite: a logged value of the last step is NaN or infinite.
    margin_explosion: the implicit log-ratio margin exceeds `margin_explosion_nats` (DPO
        drives it up without bound once pairs are separable; common with batch size 1).
    both_logps_falling: chosen and rejected logps both fell by more than `logp_fall_nats`
        between the first and the last window (the policy moves probability elsewhere).
    margin_stuck: the margin is exactly zero for a whole window (a reference that is the
        policy itself, or pairs that do not differ).
    accuracy_saturated: reward accuracy 1.0 and loss < 0.01 for a whole window (overfitting).
    Probe checks (rows written every `diagnostics.probe_every` steps):
    kl_drift: the latest sampled KL(policy || reference) exceeds `kl_max` nats.
    length_drift: the latest mean sample length exceeds `length_growth` times the reference's
        (responses getting longer instead of better).
    eval_regressing: the latest held-out implicit-reward accuracy is `eval_drop` or more
        below the best one seen so far.
    Unknown threshold names are ignored, so a whole DiagnosticsConfig can be passed.
    """
    t = {**HEALTH_DEFAULTS, **{k: v for k, v in thresholds.items() if k in HEALTH_DEFAULTS}}
    if not history:
        return []
    w, last = int(t["window"]), history[-1]
    flags = []
    if any(isinstance(v, float) and not math.isfinite(v) for v in last.values()):
        flags.append("nonfinite")
    if math.isfinite(last.get("rewards/margins", 0.0)) and last.get("rewards/margins", 0.0) / beta > t["margin_explosion_nats"]:
        flags.append("margin_explosion")
    if len(history) >= 2 * w:
        head, tail = history[:w], history[-w:]
        fell = [_window_mean(head, k) - _window_mean(tail, k) for k in ("logps/chosen", "logps/rejected")]
        if all(f > t["logp_fall_nats"] for f in fell):
            flags.append("both_logps_falling")
    if len(history) >= w:
        tail = history[-w:]
        if all(r.get("rewards/margins", 1.0) == 0.0 for r in tail):
            flags.append("margin_stuck")
        if paired and all(r.get("rewards/accuracies", 0.0) >= 1.0 and r.get("loss", 1.0) < 0.01 for r in tail):
            flags.append("accuracy_saturated")
    kl = _probed(history, "probe/kl")
    if kl and kl[-1] > t["kl_max"]:
        flags.append("kl_drift")
    lengths, ref = _probed(history, "probe/sample_length"), _probed(history, "probe/reference_length")
    if lengths and ref and ref[0] > 0 and lengths[-1] > t["length_growth"] * ref[0]:
        flags.append("length_drift")
    acc = _probed(history, "probe/eval_accuracy")
    if len(acc) >= 2 and max(acc) - acc[-1] >= t["eval_drop"]:
        flags.append("eval_regressing")
    return flags
