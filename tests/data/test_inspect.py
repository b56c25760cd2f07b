"""data/inspect.py: statistics of a preference file, on constructed records with known answers."""

import json
import subprocess
import sys

import pytest

from conftest import HH_TRAIN, PAIRS, needs_shared, write_jsonl
from preftune.data import load_records
from preftune.data.inspect import inspect_records


def _stats(tmp_path, rows, tokenizer, **kw):
    recs = load_records(write_jsonl(tmp_path / "d.jsonl", rows), allow_degenerate=True, **kw)
    return inspect_records(recs, tokenizer, max_length=kw.get("max_length", 64), max_prompt_length=16)


def test_length_bias_duplicates_and_identical_pairs(tmp_path, tokenizer):
    rows = [{"prompt": "The movie was", "chosen": " great and wonderful and long.", "rejected": " bad."},
            {"prompt": "I hated", "chosen": " nothing about it at all.", "rejected": " it."},
            {"prompt": "What is", "chosen": " x.", "rejected": " a much longer answer here."},
            {"prompt": "Same", "chosen": " same.", "rejected": " same."},
            {"prompt": "The movie was", "chosen": " great and wonderful and long.", "rejected": " bad."}]
    s = _stats(tmp_path, rows, tokenizer)
    assert s["records"] == 5 and s["distinct_prompts"] == 4 and s["kind"] == "paired"
    assert s["length_bias"]["chosen_longer"] == 0.6  # rows 1, 2 and the duplicate of 1
    assert s["length_bias"]["chosen_shorter"] == 0.2 and s["length_bias"]["equal"] == 0.2
    assert s["identical_pairs"] == 1 and s["duplicate_pairs"] == 1 and s["prompts_with_several_pairs"] == 1
    assert s["truncated"]["pairs"] == 0


def test_truncation_counts_at_the_configured_length(tmp_path, tokenizer):
    rows = [{"prompt": "p", "chosen": " word" * 40, "rejected": " no."}, *PAIRS[:3]]
    recs = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert inspect_records(recs, tokenizer, max_length=20, max_prompt_length=8)["truncated"]["pairs"] == 1
    assert inspect_records(recs, tokenizer, max_length=200, max_prompt_length=8)["truncated"]["pairs"] == 0
    full = inspect_records(recs, tokenizer, max_length=20, max_prompt_length=8)["chosen_tokens"]
    assert full["max"] > 20  # distributions are of the full, uncut lengths


def test_token_boundary_mismatch_is_counted(tmp_path, tokenizer):
    # a prompt ending in a space: "was " + "great" merges differently from "was" + " great"
    rows = [{"prompt": "The movie was ", "chosen": "great.", "rejected": "bad."},
            {"prompt": "The movie was", "chosen": " great.", "rejected": " bad."}]
    assert _stats(tmp_path, rows, tokenizer)["boundary_mismatches"] == 1


def test_unpaired_label_balance(tmp_path, tokenizer):
    rows = [{"prompt": "q", "completion": " a", "label": True}] * 3 + [{"prompt": "q", "completion": " b",
                                                                      "label": False}]
    recs = load_records(write_jsonl(tmp_path / "u.jsonl", rows), paired=False)
    s = inspect_records(recs, tokenizer, max_length=64, max_prompt_length=16)
    assert (s["kind"], s["desirable"], s["undesirable"], s["desirable_fraction"]) == ("unpaired", 3, 1, 0.75)


@needs_shared
@pytest.mark.slow
def test_inspect_hh_train_reports_its_length_bias():
    out = subprocess.run([sys.executable, "-m", "preftune", "data", "inspect", str(HH_TRAIN), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["records"] == 1800
    assert 0.40 < s["length_bias"]["chosen_longer"] < 0.48  # harmless data prefers the shorter reply


@needs_shared
def test_inspect_hh_train_with_the_tiny_tokenizer(tiny_model_dir, capsys):
    from preftune.cli import main

    assert main(["data", "inspect", str(HH_TRAIN), f"model.name_or_path={tiny_model_dir}"]) == 0
    out = capsys.readouterr().out
    assert "1800 paired records" in out and "length bias: chosen longer in 4" in out
