"""label/machine.py: `preftune score` and `preftune data sft-pairs`."""

import json

from conftest import PAIRS, write_jsonl
from preftune.cli import main


def test_score_adds_columns_to_completion_and_preference_files(tmp_path, capsys):
    comp = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "abc", "id": 7},
                                             {"prompt": "q", "completion": ""}])
    assert main(["score", str(comp), "--reward", "fn:conftest:length_reward", "--out", str(tmp_path / "c2.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "c2.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": "p", "completion": "abc", "id": 7, "score": 3.0},
                    {"prompt": "q", "completion": "", "score": 0.0}]
    pairs = write_jsonl(tmp_path / "p.jsonl", PAIRS[:2])
    assert main(["score", str(pairs), "--reward", "fn:conftest:length_reward", "--out", str(tmp_path / "p2.jsonl")]) == 0
    row = json.loads((tmp_path / "p2.jsonl").read_text().splitlines()[0])
    assert row["score_chosen"] == len(PAIRS[0]["chosen"]) and row["score_rejected"] == len(PAIRS[0]["rejected"])


def test_score_bad_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "x"}, {"prompt": "q"}])
    out = tmp_path / "o.jsonl"
    assert main(["score", str(bad), "--reward", "fn:conftest:length_reward", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"{bad}:2: completion: missing (the record has: prompt; map a column "
                                               "with data.column_map='{YOUR_COLUMN: completion}')")
    assert not out.exists()


def test_sft_pairs_human_chosen_policy_rejected_with_a_reward_filter(tmp_path, tiny_model_dir, capsys):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p["prompt"], "response": " a long and careful human answer"}
                                              for p in PAIRS[:4]])
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "sft-pairs", str(sft), "--out", str(out), "--reward", "fn:conftest:length_reward",
                 f"model.name_or_path={tiny_model_dir}", "online.max_new_tokens=4"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert result["pairs"] == len(rows) == 4 - result["reward_disagrees"] - result["identical"]
    assert rows and all(r["chosen"] == " a long and careful human answer" for r in rows)
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
