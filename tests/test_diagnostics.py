import math

import torch

from preftune.diagnostics import health_checks, step_metrics


def _rows(n, **series):
    """n metric rows; each series is a function of the step index."""
    return [{"step": i + 1, **{k.replace("__", "/"): f(i) for k, f in series.items()}} for i in range(n)]


HEALTHY = dict(loss=lambda i: 0.69 - 0.01 * i, rewards__margins=lambda i: 0.05 * i,
               rewards__accuracies=lambda i: 0.6, logps__chosen=lambda i: -50 + 0.1 * i,
               logps__rejected=lambda i: -60 - 0.2 * i)


def test_healthy_run_is_silent():
    assert health_checks(_rows(30, **HEALTHY), beta=0.1) == []


def test_margin_explosion():
    rows = _rows(5, **{**HEALTHY, "rewards__margins": lambda i: 3.0 * i})  # last: 12 / 0.1 = 120 nats
    assert "margin_explosion" in health_checks(rows, beta=0.1)
    assert "margin_explosion" not in health_checks(rows[:2], beta=0.1)  # 3 / 0.1 = 30 nats


def test_both_logps_falling():
    rows = _rows(20, **{**HEALTHY, "logps__chosen": lambda i: -50 - 1.0 * i, "logps__rejected": lambda i: -60 - 2 * i})
    assert "both_logps_falling" in health_checks(rows, beta=0.1)


def test_margin_stuck_like_chosen_equals_rejected():
    rows = _rows(10, **{**HEALTHY, "rewards__margins": lambda i: 0.0, "loss": lambda i: math.log(2)})
    assert health_checks(rows, beta=0.1) == ["margin_stuck"]
    assert health_checks(rows[:9], beta=0.1) == []  # not a whole window yet


def test_accuracy_saturated():
    rows = _rows(12, **{**HEALTHY, "rewards__accuracies": lambda i: 1.0, "loss": lambda i: 0.001})
    assert "accuracy_saturated" in health_checks(rows, beta=0.1)
    assert "accuracy_saturated" not in health_checks(rows, beta=0.1, paired=False)


def test_nonfinite():
    rows = _rows(3, **HEALTHY)
    rows[-1]["loss"] = float("nan")
    assert "nonfinite" in health_checks(rows, beta=0.1)


def test_step_metrics_paired_hand_values():
    """margins 0.3 and -0.1 -> mean 0.1, accuracy 0.5."""
    parts = {"losses": torch.tensor([0.5, 0.7]), "chosen_rewards": torch.tensor([0.2, 0.0]),
             "rejected_rewards": torch.tensor([-0.1, 0.1]), "policy_chosen": torch.tensor([-10.0, -20.0]),
             "policy_rejected": torch.tensor([-30.0, -40.0]), "chosen_lengths": torch.tensor([3, 5]),
             "rejected_lengths": torch.tensor([4, 4]), "orpo/log_odds_ratio": torch.tensor([1.0, 2.0])}
    row = step_metrics(parts, paired=True)
    assert abs(row["rewards/margins"] - 0.1) < 1e-7
    assert row["rewards/accuracies"] == 0.5 and row["logps/chosen"] == -15.0 and row["lengths/chosen"] == 4.0
    assert row["orpo/log_odds_ratio"] == 1.5


def test_step_metrics_unpaired_split_by_label():
    parts = {"losses": torch.tensor([0.4, 0.6, 0.5]), "rewards": torch.tensor([0.3, -0.2, 0.1]),
             "labels": torch.tensor([True, False, True]), "policy": torch.tensor([-1.0, -2.0, -3.0]),
             "lengths": torch.tensor([2, 4, 6]), "kl": torch.tensor([0.5, 0.5, 0.5])}
    row = step_metrics(parts, paired=False)
    assert abs(row["rewards/chosen"] - 0.2) < 1e-7 and abs(row["rewards/rejected"] + 0.2) < 1e-7
    assert abs(row["rewards/margins"] - 0.4) < 1e-7 and row["kl"] == 0.5
    assert (row["examples/desirable"], row["examples/undesirable"]) == (2, 1)
