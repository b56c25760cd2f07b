import json
import math

import pytest

from preftune.cli import main
from preftune.models.rewards import build_reward
from preftune.models.rewards.verifiable import arithmetic_answer, arithmetic_problems, arithmetic_reward


def test_train_and_heldout_never_share_a_problem_whatever_the_seed():
    train = {r["prompt"][0]["content"] for seed in range(3) for r in arithmetic_problems(400, split="train", seed=seed)}
    held = {r["prompt"][0]["content"] for seed in range(3) for r in arithmetic_problems(100, split="heldout", seed=seed)}
    assert len(held) > 100 and not train & held
    rows = arithmetic_problems(50, split="train", seed=1)
    assert rows == arithmetic_problems(50, split="train", seed=1) != arithmetic_problems(50, split="train", seed=2)
    assert all(r["prompt"][0]["role"] == "user" for r in rows)
    assert all(int(r["answer"]) == arithmetic_answer(r["prompt"][0]["content"]) >= 0 for r in rows)
    with pytest.raises(ValueError, match="only"):
        arithmetic_problems(10**6, split="train")


def test_the_verifier_reads_the_last_integer_and_cannot_verify_foreign_prompts():
    p = "user: What is 23 + 48? Reply with the number only.\nassistant:"  # render.plain_text of the message
    scores = arithmetic_reward([p] * 8 + ["Tell me a joke."],
                               ["71", " 71.", "The answer is 71", "23 + 48 = 71", "71 or 72", "seventy-one", "-71",
                                "23 + 48 = ", "71"])
    assert scores[:8] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert math.isnan(scores[8])
    assert arithmetic_answer("What is 30 - 7? Reply with the number only.") == 23
    assert build_reward("arithmetic").score([p], ["71"]) == [1.0]


def test_cli_writes_both_splits(tmp_path, capsys):
    assert main(["data", "arithmetic", str(tmp_path / "t"), "--train", "20", "--heldout", "5"]) == 0
    train = [json.loads(x) for x in (tmp_path / "t" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (tmp_path / "t" / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 20 and len(held) == 5 and set(train[0]) == {"prompt", "answer"}
    assert "online.reward=arithmetic" in capsys.readouterr().out
    assert main(["data", "arithmetic", str(tmp_path / "u"), "--heldout", "100000"]) == 2
    assert not (tmp_path / "u").exists()
