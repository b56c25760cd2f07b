"""Standard per-step metrics, as pure functions of tensors already computed by the loop.

Keys follow the DPO reference / TRL names so dashboards carry over.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: config (and the CLI's --help) read CHECKS without importing torch
    import torch

__all__ = ["step_metrics", "pair_metrics", "score_metrics", "unpaired_metrics", "demonstration_metrics",
           "rollout_metrics", "policy_gradient_metrics", "health_checks", "health_check", "HEALTH_CHECKS", "HEALTH_DEFAULTS", "THRESHOLDS",
           "CHECKS"]


def _mean(x: torch.Tensor) -> float:
    return x.float().mean().item() if x.numel() else float("nan")


def step_metrics(parts: dict[str, torch.Tensor], kind) -> dict[str, float]:
    """One optimizer step's logged row from `parts`, the per-example tensors gathered over the step
    (see step.loss_forward), through the loss kind's metrics (kinds.py). Loss-specific extras (e.g.
    `kl`, `orpo/log_odds_ratio`) are averaged under their own names."""
    return kind.metrics(parts)


def _extras(row: dict, parts: dict, standard: set) -> dict:
    row.update({k: _mean(v) for k, v in parts.items() if k not in standard})
    return row


def demonstration_metrics(parts: dict) -> dict[str, float]:
    """SFT: nll/token over every completion token of the step (not a mean of means)."""
    tokens = parts["lengths"].sum().clamp(min=1)
    nll = (-parts["policy"].sum() / tokens).item()
    row = {
        "loss": _mean(parts["losses"]),
        "nll/token": nll,
        "perplexity": math.exp(min(nll, 50.0)),
        "lengths/completion": _mean(parts["lengths"]),
        "tokens": int(parts["lengths"].sum()),
        "examples": int(parts["losses"].numel()),
    }
    return _extras(row, parts, {"losses", "policy", "lengths"})


def rollout_metrics(parts: dict) -> dict[str, float]:
    """GRPO: sampled completions scored by a reward, one advantage each."""
    row = {
        "loss": _mean(parts["losses"]),
        "reward/mean": _mean(parts["rewards"]),
        "reward/group_std": _mean(parts["group_std"]),
        "groups/zero_variance": _mean(parts["group_std"] == 0),
        "advantages/abs": _mean(parts["advantages"].abs()),
        "logps/completion": _mean(parts["policy"]),
        "lengths/completion": _mean(parts["lengths"]),
        "completions": int(parts["losses"].numel()),
    }
    if "sampler_diff_sum" in parts:  # |log p_sampler - log p_trainer| over the step's sampled tokens
        row["sampler/logp_diff_mean"] = (parts["sampler_diff_sum"].sum() / parts["lengths"].sum().clamp(min=1)).item()
        row["sampler/logp_diff_max"] = parts["sampler_diff_max"].max().item()
    return _extras(row, parts, {"losses", "rewards", "group_std", "advantages", "policy", "lengths",
                                "sampler_diff_sum", "sampler_diff_max"})


def policy_gradient_metrics(parts: dict) -> dict[str, float]:
    """PPO / RLOO / REINFORCE++: the score, the KL penalty in the reward (non-score reward), the
    clip fractions, approx-KL, entropy and (PPO) the critic's loss and explained variance."""
    row = {
        "loss": _mean(parts["losses"]),
        "reward/mean": _mean(parts["rewards"]),
        "logps/completion": _mean(parts["policy"]),
        "lengths/completion": _mean(parts["lengths"]),
        "completions": int(parts["losses"].numel()),
    }
    names = {"kl_seq": "kl", "non_score": "reward/non_score", "returns_mean": "returns/mean",
             "advantages_mean": "advantages/mean", "kl_coef": "kl_coef", "explained_variance": "value/explained_variance",
             "no_eos": "completions/no_eos"}
    row.update({names[k]: _mean(parts[k]) for k in names if k in parts})
    if "sampler_diff_sum" in parts:
        row["sampler/logp_diff_mean"] = (parts["sampler_diff_sum"].sum() / parts["lengths"].sum().clamp(min=1)).item()
        row["sampler/logp_diff_max"] = parts["sampler_diff_max"].max().item()
    return _extras(row, parts, {"losses", "rewards", "policy", "lengths", "sampler_diff_sum", "sampler_diff_max",
                                *names})


_PAIR_PARTS = {"losses", "chosen_rewards", "rejected_rewards", "policy_chosen", "policy_rejected", "chosen_lengths",
               "rejected_lengths", "logratio_chosen", "logratio_rejected", "reference_chosen", "reference_rejected"}


def pair_metrics(parts: dict) -> dict[str, float]:
    """Pairs: rewards/accuracies is the fraction of pairs with a positive margin."""
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
    if "logratio_chosen" in parts:  # losses with a reference: policy - reference logp, same pairs
        row["logratios/chosen"] = _mean(parts["logratio_chosen"])
        row["logratios/rejected"] = _mean(parts["logratio_rejected"])
    return _extras(row, parts, _PAIR_PARTS)


def score_metrics(parts: dict) -> dict[str, float]:
    """A reward model's pairs: as `pair_metrics`, but its "log-probs" are its scores, and the
    log-prob checks must not read them."""
    row = pair_metrics(parts)
    row["scores/chosen"], row["scores/rejected"] = row.pop("logps/chosen"), row.pop("logps/rejected")
    return row


def unpaired_metrics(parts: dict) -> dict[str, float]:
    """KTO: rewards/chosen and rewards/rejected average over desirable and undesirable examples,
    and the margin is their difference."""
    good = parts["labels"].bool()
    row = {"loss": _mean(parts["losses"])}
    # a step may hold one class only: the other side has no value that step (absent, not NaN)
    for side, mask in (("chosen", good), ("rejected", ~good)):
        if mask.any():
            row[f"rewards/{side}"] = _mean(parts["rewards"][mask])
            row[f"logps/{side}"] = _mean(parts["policy"][mask])
            row[f"lengths/{side}"] = _mean(parts["lengths"][mask])
            if "logratio" in parts:
                row[f"logratios/{side}"] = _mean(parts["logratio"][mask])
    if good.any() and (~good).any():
        row["rewards/margins"] = row["rewards/chosen"] - row["rewards/rejected"]
    row.update({"examples/desirable": int(good.sum()), "examples/undesirable": int((~good).sum())})
    return _extras(row, parts, {"losses", "rewards", "labels", "policy", "lengths", "logratio"})


# ---- health checks: a registry of named, pure functions over the metric history ----------------

@dataclass(frozen=True)
class Threshold:
    default: float | int
    help: str


@dataclass(frozen=True)
class HealthCheck:
    """`fn(history, t, *, beta, paired) -> bool` says whether the pattern shows at the last step;
    `t` maps every threshold name to its value."""
    name: str
    fn: Callable
    thresholds: tuple[str, ...]
    summary: str


# the thresholds the checks read; config.DiagnosticsConfig takes its fields (default, help) from here
THRESHOLDS: dict[str, Threshold] = {
    "margin_explosion_nats": Threshold(50.0, "margin_explosion: mean implicit log-ratio margin above this (nats)"),
    "logp_fall_nats": Threshold(5.0, "both_logps_falling: chosen and rejected logps both fell by more than this"),
    "window": Threshold(10, "steps averaged at the start and the end of the history by the window checks"),
    "kl_max": Threshold(10.0, "kl_drift: sampled KL(policy || reference) above this (nats per sample)"),
    "length_growth": Threshold(1.5, "length_drift: policy samples longer than this times the reference's"),
    "length_shrink": Threshold(0.5, "length_collapse: policy samples shorter than this times the reference's"),
    "eval_drop": Threshold(0.05, "eval_regressing: held-out accuracy this far below its best probe"),
    "sampler_logp_diff": Threshold(0.05, "sampler_mismatch: mean |log p_sampler - log p_trainer| per sampled "
                                         "token above this (nats)"),
}
HEALTH_DEFAULTS = {name: th.default for name, th in THRESHOLDS.items()}
HEALTH_CHECKS: dict[str, HealthCheck] = {}


def health_check(name: str, *thresholds: str):
    """Register `fn` as the health check `name`, reading `thresholds` (names in THRESHOLDS)."""
    unknown = set(thresholds) - set(THRESHOLDS)
    if unknown:
        raise ValueError(f"health check {name!r} reads unknown thresholds {sorted(unknown)}")

    def register(fn):
        if name in HEALTH_CHECKS:
            raise ValueError(f"health check {name!r} is registered twice")
        HEALTH_CHECKS[name] = HealthCheck(name, fn, thresholds, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return register


def _window_mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return sum(values) / len(values) if values else float("nan")


def _probed(history: list[dict], key: str) -> list[float]:
    """The finite values of a key that only probe steps carry, oldest first."""
    return [r[key] for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


@health_check("nonfinite")
def _nonfinite(history, t, **_):
    """A logged value of the last step is NaN or infinite. (Unpaired steps that hold one class only
    log nothing for the other side; rows written before that logged NaN there, which is not a fault.)"""
    row = history[-1]
    empty = {"rejected": row.get("examples/undesirable") == 0, "chosen": row.get("examples/desirable") == 0}
    undefined = {k for k in row if any(e and k.endswith("/" + side) for side, e in empty.items())}
    if any(empty.values()):
        undefined.add("rewards/margins")
    return any(isinstance(v, float) and not math.isfinite(v) for k, v in row.items() if k not in undefined)


@health_check("margin_explosion", "margin_explosion_nats")
def _margin_explosion(history, t, *, beta, **_):
    """The implicit log-ratio margin exceeds `margin_explosion_nats` (DPO drives it up without
    bound once pairs are separable; common with batch size 1)."""
    margin = history[-1].get("rewards/margins", 0.0)
    return math.isfinite(margin) and margin / beta > t["margin_explosion_nats"]


@health_check("both_logps_falling", "logp_fall_nats", "window")
def _both_logps_falling(history, t, **_):
    """Chosen and rejected logps both fell by more than `logp_fall_nats` (the policy moves
    probability elsewhere): over the last window, the mean policy - reference log-ratio of the
    step's own pairs (0 at the start), when the loss has a reference; else (simpo, orpo) the mean
    logps of the first window minus those of the last, which also moves with the batches' lengths."""
    w = int(t["window"])
    tail = history[-w:]
    if len(history) >= w and all("logratios/chosen" in r or "logratios/rejected" in r for r in tail):
        return all(_window_mean(tail, k) < -t["logp_fall_nats"] for k in ("logratios/chosen", "logratios/rejected"))
    if len(history) < 2 * w:
        return False
    head = history[:w]
    return all(_window_mean(head, k) - _window_mean(tail, k) > t["logp_fall_nats"]
               for k in ("logps/chosen", "logps/rejected"))


@health_check("margin_stuck", "window")
def _margin_stuck(history, t, **_):
    """The margin is exactly zero for a whole window (a reference that is the policy itself, or
    pairs that do not differ)."""
    w = int(t["window"])
    return len(history) >= w and all(r.get("rewards/margins", 1.0) == 0.0 for r in history[-w:])


@health_check("accuracy_saturated", "window")
def _accuracy_saturated(history, t, *, paired, **_):
    """Reward accuracy 1.0 and loss < 0.01 for a whole window (overfitting)."""
    w = int(t["window"])
    return paired and len(history) >= w and all(r.get("rewards/accuracies", 0.0) >= 1.0 and r.get("loss", 1.0) < 0.01
                                                 for r in history[-w:])


@health_check("kl_drift", "kl_max")
def _kl_drift(history, t, **_):
    """Probe: the latest sampled KL(policy || reference) exceeds `kl_max` nats."""
    kl = _probed(history, "probe/kl")
    return bool(kl) and kl[-1] > t["kl_max"]


def _length_ratio(history: list[dict]) -> float | None:
    """The latest probe's mean sample length over the reference's (measured once per run)."""
    lengths, ref = _probed(history, "probe/sample_length"), _probed(history, "probe/reference_length")
    return lengths[-1] / ref[0] if lengths and ref and ref[0] > 0 else None


@health_check("length_drift", "length_growth")
def _length_drift(history, t, **_):
    """Probe: the latest mean sample length exceeds `length_growth` times the reference's
    (responses getting longer instead of better)."""
    ratio = _length_ratio(history)
    return ratio is not None and ratio > t["length_growth"]


@health_check("length_collapse", "length_shrink")
def _length_collapse(history, t, **_):
    """Probe: the latest mean sample length is below `length_shrink` times the reference's
    (answers cut short: a policy that ends early to lower the rejected side's log-prob)."""
    ratio = _length_ratio(history)
    return ratio is not None and ratio < t["length_shrink"]


@health_check("sampler_mismatch", "sampler_logp_diff")
def _sampler_mismatch(history, t, **_):
    """The sampler's log-probs of the tokens it drew disagree with the trainer's on the same
    weights by more than `sampler_logp_diff` nats per token on average (a sampling engine on other
    weights, in another precision, or stale): the policy gradient is then off-policy; see
    loss.tis_cap."""
    diff = history[-1].get("sampler/logp_diff_mean")
    return diff is not None and math.isfinite(diff) and diff > t["sampler_logp_diff"]


@health_check("eval_regressing", "eval_drop")
def _eval_regressing(history, t, **_):
    """Probe: the latest held-out implicit-reward accuracy is `eval_drop` or more below the
    best one seen so far."""
    acc = _probed(history, "probe/eval_accuracy")
    return len(acc) >= 2 and max(acc) - acc[-1] >= t["eval_drop"]


CHECKS = tuple(HEALTH_CHECKS)


def health_checks(history: list[dict], *, beta: float, paired: bool = True, **thresholds) -> list[str]:
    """Names of the registered checks (HEALTH_CHECKS) whose pattern the history shows at its last
    step. Probe checks read the rows written every `diagnostics.probe_every` steps. Unknown
    threshold names are ignored, so a whole DiagnosticsConfig can be passed."""
    if not history:
        return []
    t = {**HEALTH_DEFAULTS, **{k: v for k, v in thresholds.items() if k in THRESHOLDS}}
    return [name for name, check in HEALTH_CHECKS.items() if check.fn(history, t, beta=beta, paired=paired)]
