"""advise.py: each rule fires on the data shape it is for, and says why."""

from preftune.advise import advise, memory_estimate_gb

PAIRED = {"kind": "paired", "records": 5000, "length_bias": {"chosen_longer": 0.5}, "identical_pairs": 0,
          "duplicate_pairs": 0, "truncated": {"pairs": 0}}
P135M = 135_000_000


def test_large_paired_data_gets_dpo():
    a = advise(PAIRED, params=P135M, memory_gb=None, lora=True)
    assert a.loss == "sigmoid" and a.warnings == [] and "5000 preference pairs" in a.reasons[0]


def test_small_paired_data_gets_ipo():
    a = advise({**PAIRED, "records": 300}, params=P135M, memory_gb=None, lora=True)
    assert a.loss == "ipo" and "300 pairs" in a.reasons[0]


def test_unpaired_data_gets_kto_with_class_weights_when_imbalanced():
    stats = {"kind": "unpaired", "records": 1000, "desirable": 200, "undesirable": 800, "desirable_fraction": 0.2}
    a = advise(stats, params=P135M, memory_gb=None, lora=True)
    assert a.loss == "kto" and "loss.kto_auto_weights=true" in a.overrides


def test_no_room_for_a_reference_gets_reference_free():
    # full fine-tuning: 16 B/param without a reference, 20 with one
    without, with_ref = memory_estimate_gb(P135M, lora=False, reference=False), memory_estimate_gb(
        P135M, lora=False, reference=True)
    assert with_ref / without == 20 / 16
    budget = (without + with_ref) / 2
    a = advise(PAIRED, params=P135M, memory_gb=budget, lora=False)
    assert a.loss == "simpo" and "reference" in a.reasons[0]
    assert advise(PAIRED, params=P135M, memory_gb=budget, lora=True).loss == "sigmoid"  # LoRA's reference is free


def test_warnings_for_length_bias_duplicates_and_truncation():
    stats = {**PAIRED, "length_bias": {"chosen_longer": 0.8}, "duplicate_pairs": 12, "truncated": {"pairs": 900}}
    text = advise(stats, params=P135M, memory_gb=None, lora=True).text()
    assert "80% of pairs" in text and "12 duplicate pairs" in text and "900 of 5000 records are truncated" in text
