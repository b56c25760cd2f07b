import json

from conftest import write_jsonl
from preftune.cli import main
from preftune.data import load_records
from preftune.data.balance import balance_length


def _rows(longer: int, shorter: int, equal: int) -> list[dict]:
    rows = [{"prompt": f"p{i}", "chosen": " a long answer here", "rejected": " no"} for i in range(longer)]
    rows += [{"prompt": f"q{i}", "chosen": " yes", "rejected": " a much longer rejected one"} for i in range(shorter)]
    rows += [{"prompt": f"r{i}", "chosen": " abc", "rejected": " xyz"} for i in range(equal)]
    return rows


def test_the_larger_side_is_dropped_down_to_the_smaller_and_equal_pairs_stay(tmp_path, tokenizer):
    records = load_records(write_jsonl(tmp_path / "d.jsonl", _rows(9, 2, 1)))
    kept, counts = balance_length(records, tokenizer, seed=0)
    assert counts == {"pairs_in": 12, "chosen_longer_in": 9, "chosen_shorter_in": 2, "equal": 1, "dropped": 7,
                      "pairs_out": 5, "chosen_longer_out": 2, "chosen_shorter_out": 2}
    assert [r.line for r in kept] == sorted(r.line for r in kept)  # original order
    assert sum(r.prompt.startswith("q") for r in kept) == 2 and sum(r.prompt.startswith("r") for r in kept) == 1
    again, _ = balance_length(records, tokenizer, seed=0)
    other, _ = balance_length(records, tokenizer, seed=1)
    assert [r.line for r in again] == [r.line for r in kept] != [r.line for r in other]


def test_cli_writes_balanced_pairs_or_one_line(tmp_path, tiny_model_dir, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", _rows(6, 3, 0))
    out = tmp_path / "balanced.jsonl"
    assert main(["data", "balance-length", str(src), "--out", str(out), f"model.name_or_path={tiny_model_dir}"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["pairs_out"] == 6 and counts["dropped"] == 3
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    only_longer = write_jsonl(tmp_path / "e.jsonl", _rows(4, 0, 0))
    assert main(["data", "balance-length", str(only_longer), "--out", str(tmp_path / "none.jsonl"),
                 f"model.name_or_path={tiny_model_dir}"]) == 2
    assert "no pair left" in capsys.readouterr().err and not (tmp_path / "none.jsonl").exists()
