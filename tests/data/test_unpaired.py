"""Unpaired (KTO) data: formats, conversion from pairs, tokenization and the KL-row collate."""

import json

import pytest
import torch

from conftest import PAIRS, SHARED, write_jsonl
from preftune.data import collate_unpaired, load_records, to_unpaired, tokenize_unpaired
from preftune.data.records import UnpairedRecord
from preftune.data.sources import split_path
from preftune.data.tokenize import TokenizedExample
from preftune.utils.errors import DataError

TRUTH = SHARED / "data" / "truthfulqa"


def test_unpaired_rows_and_csv_string_labels(tmp_path):
    rows = [{"prompt": "Q: sky?\nA:", "completion": " blue", "label": True},
            {"prompt": "Q: sky?\nA:", "completion": " green", "label": False}]
    recs = load_records(write_jsonl(tmp_path / "u.jsonl", rows), paired=False)
    assert [(r.completion, r.label, r.line) for r in recs] == [(" blue", True, 1), (" green", False, 2)]
    (tmp_path / "u.csv").write_text("prompt,completion,label\nQ,A,true\nQ,B,0\n")
    assert [r.label for r in load_records(tmp_path / "u.csv", paired=False)] == [True, False]


def test_truth_label_rows_become_question_answer_label(tmp_path):
    rows = [{"prompt": "Q: Is water wet?\nA: Yes, it is.\nTrue:", "completion": " yes"},
            {"prompt": "Q: Is fire cold?\nA: Yes.\nTrue:", "completion": " no"}]
    recs = load_records(write_jsonl(tmp_path / "t.jsonl", rows), paired=False)
    assert (recs[0].prompt, recs[0].completion, recs[0].label) == ("Q: Is water wet?\nA:", " Yes, it is.", True)
    assert recs[1].label is False


@pytest.mark.parametrize("row, field, problem", [
    ({"prompt": "p", "completion": " a", "label": "maybe"}, "label", "expected true/false"),
    ({"prompt": "p", "completion": " a", "label": 2}, "label", "expected true/false"),
    ({"prompt": "Q: x\nA: y\nTrue:", "completion": " perhaps"}, "completion", "expected ' yes' or ' no'"),
])
def test_bad_unpaired_rows(tmp_path, row, field, problem):
    with pytest.raises(DataError) as info:
        load_records(write_jsonl(tmp_path / "u.jsonl", [row]), paired=False)
    assert info.value.field == field and problem in info.value.problem


def test_paired_and_unpaired_mismatches_are_one_line_errors(tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    with pytest.raises(DataError, match=r"needs unpaired .*paired_to_unpaired=true"):
        load_records(pairs, paired=False)
    unpaired = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "completion": " a", "label": True}])
    with pytest.raises(DataError, match=r"u.jsonl:1: format: this loss needs paired"):
        load_records(unpaired)


def test_pairs_convert_to_two_labelled_examples(tmp_path):
    recs = to_unpaired(load_records(write_jsonl(tmp_path / "p.jsonl", PAIRS[:2])))
    assert [(r.completion, r.label, r.line) for r in recs] == [
        (" great and wonderful.", True, 1), (" slow and boring.", False, 1),
        (" nothing about it.", True, 2), (" the ending.", False, 2)]


def test_slices_select_records_and_keep_true_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    assert split_path(f"{path}[2:5]") == (path, slice(2, 5))
    assert [r.line for r in load_records(f"{path}[2:5]")] == [3, 4, 5]
    assert [r.line for r in load_records(f"{path}[-2:]")] == [7, 8]
    with pytest.raises(DataError, match="no records in the slice"):
        load_records(f"{path}[20:]")


def test_truthfulqa_csv_pairs(tmp_path):
    (tmp_path / "tqa.csv").write_text(
        "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
        'A,B,Why is the sky blue?,Rayleigh scattering,Rayleigh scattering; Scattering,"It reflects the sea; Paint",x\n')
    (rec,) = load_records(tmp_path / "tqa.csv")
    assert (rec.prompt, rec.chosen, rec.rejected, rec.line) == (
        "Q: Why is the sky blue?\nA:", " Rayleigh scattering", " It reflects the sea", 2)


@pytest.mark.skipif(not TRUTH.is_dir(), reason="../shared/data is absent")
def test_real_truthfulqa_files():
    pairs = load_records(TRUTH / "TruthfulQA.visible.csv")
    labels = load_records(TRUTH / "truth_labels.visible.jsonl", paired=False)
    assert (len(pairs), len(labels)) == (612, 16811)
    assert sum(r.label for r in labels) == 7093
    questions = {p.prompt for p in pairs}
    assert sum(r.prompt in questions for r in labels) > 16000  # the two files share prompts


def test_tokenize_and_collate_kl_rows(tokenizer):
    recs = [UnpairedRecord("Q: a\nA:", " yes", True, "f", 1), UnpairedRecord("Q: b\nA:", " no", False, "f", 2),
            UnpairedRecord("Q: c\nA:", " maybe", True, "f", 3)]
    examples, stats = tokenize_unpaired(recs, tokenizer, max_length=32, max_prompt_length=16)
    assert (stats.desirable, stats.undesirable, stats.pairs) == (2, 1, 3)
    assert examples[0].completion_ids[-1] == tokenizer.eos_token_id
    batch = collate_unpaired(examples, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].tolist() == [True, False, True]
    # KL row 3 is prompt 0 followed by completion 1
    n0 = len(examples[0].prompt_ids)
    row = batch["input_ids"][3, : n0 + len(examples[1].completion_ids)].tolist()
    assert row == examples[0].prompt_ids + examples[1].completion_ids
    assert batch["completion_mask"][3].sum().item() == len(examples[1].completion_ids)


def test_single_example_batch_uses_itself_for_kl():
    batch = collate_unpaired([TokenizedExample([1, 2], [3, 4], True, "f", 1)], pad_id=0)
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    assert json.dumps(batch["labels"].tolist()) == "[true]"
