"""benchmarks/scaling/agreement.py's gradient comparison: what AdamW's first step makes of two
nearly equal gradient sets."""

import pytest
import torch

from benchmarks.scaling.agreement import LR, compare


def test_a_tiny_element_of_opposite_sign_moves_its_weight_by_two_learning_rates():
    f64 = torch.float64
    ours = {"b": torch.tensor([1e-3, -2e-3, 3e-12, 0.0], dtype=f64), "a": torch.zeros(2, dtype=f64)}
    theirs = {"b": torch.tensor([1e-3 * (1 + 1e-6), -2e-3, -1e-12, 0.0], dtype=f64), "a": torch.zeros(2, dtype=f64)}
    got = compare(ours, theirs)
    assert (got["elements"], got["nonzero_elements"]) == (6, 3)
    assert got["sign_differs"] == 1 and got["sign_differs_max_abs_grad"] == pytest.approx(3e-12)
    # 3e-12 and -1e-12 are far below eps (1e-8): their updates, lr * 3e-4 and -lr * 1e-4, are apart by
    # less than the 1e-3 lr counted as "differs"; the relative 1e-6 in the first element moves nothing
    assert got["adam_update_differs"] == 0
    # |a - b| = (1e-9, 0, 4e-12, 0) against |b| = sqrt(1e-6 + 4e-6)
    assert got["grad_rel_diff_norm"] == pytest.approx((1e-18 + 16e-24) ** 0.5 / 5e-6 ** 0.5, rel=1e-4)


def test_an_element_near_eps_counts_as_a_different_update():
    ours, theirs = {"b": torch.tensor([1e-8, 1.0])}, {"b": torch.tensor([-1e-8, 1.0])}
    got = compare(ours, theirs)
    assert got["sign_differs"] == 1 and got["adam_update_differs"] == 1
    assert got["adam_update_rel_diff_norm"] == pytest.approx(LR / LR * 1.0 / (0.5 ** 2 + 1) ** 0.5, rel=1e-6)


def test_different_parameter_names_are_an_error():
    with pytest.raises(SystemExit, match="different parameters"):
        compare({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
