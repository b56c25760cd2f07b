import math

import pytest
import torch

from preftune.core.diagnostics import health_checks, step_metrics
from preftune.core.losses.kinds import PAIRS, UNPAIRED


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
    assert "both_logps_falling" in health_checks(rows, beta=0.1)  # no log-ratios (simpo, orpo): the raw logps


def test_both_logps_falling_reads_the_log_ratios_of_the_same_pairs_when_there_is_a_reference():
    """DPO on HH (benchmarks/quality, lr 5e-4): steps 41-50 drew pairs with longer chosen replies
    (45.5 against 34.2 tokens in steps 1-10), so the raw logps fell 30 nats between windows while
    the policy - reference log-ratios of the same pairs were -2.8 / -3.6 nats; the old check fired."""
    batches = _rows(100, **{**HEALTHY, "logps__chosen": lambda i: -94 - 30 * (40 <= i < 50),
                            "logps__rejected": lambda i: -127 - 6 * (40 <= i < 50),
                            "logratios__chosen": lambda i: -0.06 * min(i, 45), "logratios__rejected": lambda i: -0.08 * min(i, 45)})
    assert "both_logps_falling" not in health_checks(batches[:50], beta=0.1)  # -2.7 / -3.6: not below -5
    falling = _rows(30, **{**HEALTHY, "logratios__chosen": lambda i: -0.3 * i, "logratios__rejected": lambda i: -0.4 * i})
    assert "both_logps_falling" in health_checks(falling, beta=0.1)  # -7.4 / -9.8 over the last window
    assert "both_logps_falling" not in health_checks(falling[:15], beta=0.1)  # -2.9 / -3.8
    rising = _rows(30, **{**HEALTHY, "logratios__chosen": lambda i: 0.1 * i, "logratios__rejected": lambda i: -0.5 * i})
    assert "both_logps_falling" not in health_checks(rising, beta=0.1)  # only the rejected side falls: DPO working


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
    row = step_metrics(parts, PAIRS)
    assert abs(row["rewards/margins"] - 0.1) < 1e-7
    assert row["rewards/accuracies"] == 0.5 and row["logps/chosen"] == -15.0 and row["lengths/chosen"] == 4.0
    assert row["orpo/log_odds_ratio"] == 1.5 and "logratios/chosen" not in row  # reference-free: none
    row = step_metrics({**parts, "logratio_chosen": torch.tensor([-1.0, -3.0]),
                        "logratio_rejected": torch.tensor([-2.0, -6.0])}, PAIRS)
    assert (row["logratios/chosen"], row["logratios/rejected"]) == (-2.0, -4.0) and "logratio_chosen" not in row


def test_step_metrics_unpaired_split_by_label():
    parts = {"losses": torch.tensor([0.4, 0.6, 0.5]), "rewards": torch.tensor([0.3, -0.2, 0.1]),
             "labels": torch.tensor([True, False, True]), "policy": torch.tensor([-1.0, -2.0, -3.0]),
             "lengths": torch.tensor([2, 4, 6]), "kl": torch.tensor([0.5, 0.5, 0.5])}
    row = step_metrics(parts, UNPAIRED)
    assert abs(row["rewards/chosen"] - 0.2) < 1e-7 and abs(row["rewards/rejected"] + 0.2) < 1e-7
    assert abs(row["rewards/margins"] - 0.4) < 1e-7 and row["kl"] == 0.5
    assert (row["examples/desirable"], row["examples/undesirable"]) == (2, 1)
    row = step_metrics({**parts, "logratio": torch.tensor([-1.0, -5.0, -3.0])}, UNPAIRED)
    assert (row["logratios/chosen"], row["logratios/rejected"]) == (-2.0, -5.0)  # desirable / undesirable


def test_an_unpaired_step_with_one_class_logs_no_other_side_and_raises_no_flag():
    """A KTO micro-batch of desirable examples only (HH, step 66 of a 100-step run) logged NaN for
    the undesirable side and its margin, and `nonfinite` fired on a healthy step."""
    parts = {"losses": torch.tensor([0.4, 0.6]), "rewards": torch.tensor([0.3, 0.1]),
             "labels": torch.tensor([True, True]), "policy": torch.tensor([-1.0, -3.0]),
             "lengths": torch.tensor([2, 6]), "logratio": torch.tensor([-1.0, -3.0])}
    row = step_metrics(parts, UNPAIRED)
    assert row["rewards/chosen"] == pytest.approx(0.2) and row["logratios/chosen"] == -2.0
    assert not any(k.endswith("/rejected") for k in row) and "rewards/margins" not in row
    assert all(math.isfinite(v) for v in row.values())
    rows = _rows(12, **HEALTHY) + [{"step": 13, **row, "kl": 0.0}]
    assert "nonfinite" not in health_checks(rows, beta=0.1, paired=False)
    old = {**row, "rewards/rejected": float("nan"), "rewards/margins": float("nan"), "logps/rejected": float("nan")}
    assert "nonfinite" not in health_checks(_rows(12, **HEALTHY) + [old], beta=0.1, paired=False)  # rows from before
    assert "nonfinite" in health_checks(_rows(12, **HEALTHY) + [{**old, "loss": float("nan")}], beta=0.1, paired=False)
    assert "nonfinite" in health_checks(_rows(12, **HEALTHY) + [{**row, "logps/chosen": float("inf")}], beta=0.1,
                                        paired=False)


def _probe_rows(n, **probes):
    """n healthy rows; every 5th carries the probe keys given as functions of the step index."""
    rows = _rows(n, **HEALTHY)
    for i, r in enumerate(rows):
        if (i + 1) % 5 == 0:
            r.update({k.replace("__", "/"): f(i) for k, f in probes.items()})
    return rows


def test_kl_drift_fires_above_kl_max_and_not_below():
    rows = _probe_rows(20, probe__kl=lambda i: 0.8 * i)  # 15.2 nats at the last probe
    assert "kl_drift" in health_checks(rows, beta=0.1)
    assert "kl_drift" not in health_checks(rows, beta=0.1, kl_max=20.0)
    assert "kl_drift" not in health_checks(_probe_rows(20, probe__kl=lambda i: 0.1 * i), beta=0.1)


def test_length_drift_compares_samples_with_the_reference_length():
    rows = _probe_rows(20, probe__sample_length=lambda i: 20 + 2 * i, probe__reference_length=lambda i: 20.0)
    assert "length_drift" in health_checks(rows, beta=0.1)  # 58 > 1.5 * 20
    steady = _probe_rows(20, probe__sample_length=lambda i: 21.0, probe__reference_length=lambda i: 20.0)
    assert "length_drift" not in health_checks(steady, beta=0.1)


def test_length_collapse_flags_samples_cut_short():
    # ORPO on TruthfulQA (benchmarks/quality): samples 11.5 tokens against the reference's 44.3, unflagged before
    rows = _probe_rows(20, probe__sample_length=lambda i: 44.0 - 1.7 * i, probe__reference_length=lambda i: 44.3)
    assert "length_collapse" in health_checks(rows, beta=0.1)  # 11.7 < 0.5 * 44.3
    assert "length_collapse" not in health_checks(rows[:10], beta=0.1)  # 28.7 >= 22.15
    assert "length_collapse" not in health_checks(rows, beta=0.1, length_shrink=0.2)
    assert "length_drift" not in health_checks(rows, beta=0.1)


def test_eval_regressing_fires_when_held_out_accuracy_falls_from_its_best():
    rows = _probe_rows(20, probe__eval_accuracy=lambda i: [0.6, 0.7, 0.66, 0.62][i // 5])
    assert "eval_regressing" in health_checks(rows, beta=0.1)  # 0.70 - 0.62 >= 0.05
    assert "eval_regressing" not in health_checks(rows[:15], beta=0.1)  # 0.70 - 0.66 < 0.05
    rising = _probe_rows(20, probe__eval_accuracy=lambda i: 0.5 + 0.01 * i)
    assert "eval_regressing" not in health_checks(rising, beta=0.1)


def test_healthy_probes_stay_silent_and_config_defaults_match():
    import dataclasses

    from preftune.config import DiagnosticsConfig
    from preftune.core.diagnostics import HEALTH_DEFAULTS, THRESHOLDS

    rows = _probe_rows(30, probe__kl=lambda i: 0.05 * i, probe__sample_length=lambda i: 30.0,
                       probe__reference_length=lambda i: 28.0, probe__eval_accuracy=lambda i: 0.6 + 0.001 * i)
    assert health_checks(rows, beta=0.1, **dataclasses.asdict(DiagnosticsConfig())) == []
    cfg = dataclasses.asdict(DiagnosticsConfig())
    assert {k: cfg[k] for k in HEALTH_DEFAULTS} == HEALTH_DEFAULTS
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(DiagnosticsConfig)}
    assert all(helps[name] == th.help for name, th in THRESHOLDS.items())  # generated from the registry


def test_the_registry_runs_every_check_and_refuses_duplicates_and_unknown_thresholds():
    from preftune.core.diagnostics import HEALTH_CHECKS, health_check

    assert set(HEALTH_CHECKS) == {"nonfinite", "margin_explosion", "both_logps_falling", "margin_stuck",
                                  "accuracy_saturated", "kl_drift", "length_drift", "length_collapse",
                                  "eval_regressing", "sampler_mismatch"}
    assert all(check.summary for check in HEALTH_CHECKS.values())
    with pytest.raises(ValueError, match="twice"):
        health_check("kl_drift", "kl_max")(lambda history, t, **_: False)
    with pytest.raises(ValueError, match="unknown thresholds"):
        health_check("new_check", "no_such_threshold")


def test_sampler_mismatch_fires_above_its_threshold():
    """Rollout metrics: the mean over the step's sampled tokens (not a mean of row means) and the max."""
    from preftune.core.losses.kinds import ROLLOUTS

    parts = {"losses": torch.tensor([0.1, 0.2]), "rewards": torch.tensor([1.0, 0.0]),
             "advantages": torch.tensor([0.7, -0.7]), "group_std": torch.tensor([0.7, 0.7]),
             "policy": torch.tensor([-3.0, -4.0]), "lengths": torch.tensor([3, 1]),
             "sampler_diff_sum": torch.tensor([0.3, 0.1]), "sampler_diff_max": torch.tensor([0.2, 0.1])}
    row = step_metrics(parts, ROLLOUTS)
    assert row["sampler/logp_diff_mean"] == pytest.approx(0.1) and row["sampler/logp_diff_max"] == pytest.approx(0.2)
    assert "sampler_diff_sum" not in row
    assert "sampler_mismatch" in health_checks([row], beta=0.1, sampler_logp_diff=0.05)
    assert "sampler_mismatch" not in health_checks([row], beta=0.1, sampler_logp_diff=0.2)
