"""online/rollouts.py with a pairwise judge: a local fake judge that prefers slot A on a fixed
share of comparisons whatever they hold; those verdicts are counted and none becomes a pair."""

import hashlib
import json

import pytest

from conftest import PairwiseJudge, vowel_reward
from preftune.cli import main
from preftune.config import OnlineConfig
from preftune.runs.online.rollouts import reward_from_config
from preftune.utils.errors import ConfigError

BIAS = 0.4  # share of comparisons on which the judge answers "A" regardless of content


def _biased(a: str, b: str) -> bool:
    """Whether the fake judge is position-biased on this pair (the same in both orders)."""
    return hashlib.sha256(json.dumps(sorted([a, b])).encode()).digest()[0] < 256 * BIAS


def _vowels(text: str) -> float:
    return vowel_reward(None, [text])[0]


def _decide(a: str, b: str) -> str:
    """Slot A on a biased pair (so "A" in both orders), else the response with more vowels."""
    if _biased(a, b):
        return "A"
    return "A" if _vowels(a) > _vowels(b) else "B" if _vowels(b) > _vowels(a) else "tie"


@pytest.fixture
def judge():
    fake = PairwiseJudge(_decide)
    yield fake
    fake.close()


def test_synth_with_a_pairwise_judge_counts_and_drops_position_bias(tmp_path, tiny_model_dir, judge, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\nI hated\nWhat is the capital of France?\n")
    out = tmp_path / "pairs.jsonl"
    assert main(["synth", str(prompts), "--reward", f"judge:{judge.url}#m", "--out", str(out),
                 f"model.name_or_path={tiny_model_dir}", "online.max_new_tokens=8", "online.samples_per_prompt=4",
                 "online.judge_mode=pairwise", "online.pairing=all_pairs", "online.judge_backoff_s=0.01"]) == 0
    stats = json.loads(capsys.readouterr().out)
    asked = {frozenset(p) for p in judge.shown}
    assert len(judge.shown) == 2 * len(asked)  # every comparison in both orders, and no other call
    assert {(b, a) for a, b in judge.shown} == set(judge.shown)
    biased = {p for p in asked if _biased(*p)}
    unbiased = asked - biased
    assert biased and unbiased  # the seed gives both kinds (deterministic)
    assert stats["position_inconsistent"] == len(biased)  # every biased verdict caught ...
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert not {frozenset((p["chosen"], p["rejected"])) for p in pairs} & biased  # ... and none kept
    decided = [p for p in unbiased if len({_vowels(t) for t in p}) == 2]
    assert stats["pairs"] == len(pairs) == len(decided)
    assert all(_vowels(p["chosen"]) > _vowels(p["rejected"]) for p in pairs)  # the judge's real preference
    assert stats["ties"] == 3 * 6 - len(biased) - len(decided)  # 3 prompts x C(4, 2) comparisons in all
    assert stats["comparisons"] == 18 and stats["failed"] == 0 and stats["judge"]["failures"] == 0


def test_pairwise_needs_a_single_judge_source():
    with pytest.raises(ConfigError, match="pairwise needs one judge"):
        reward_from_config(OnlineConfig(reward="sentiment", judge_mode="pairwise"))
