"""online/rewards.py: every reward source, the ensemble and length-penalty math, bad specs."""

import re

import pytest
import torch

from conftest import PAIRS, write_jsonl
from preftune.models.rewards import build_reward
from preftune.utils.errors import ConfigError


def test_sentiment_orders_positive_above_negative():
    r = build_reward("sentiment")
    good, bad = r.score(["x", "x"], ["a wonderful, lovely film", "an awful, terrible film"])
    assert good > 0.5 and bad < -0.5


def test_function_source_and_its_errors():
    r = build_reward("fn:conftest:length_reward")
    assert r.score(["p", "p"], ["abc", ""]) == [3.0, 0.0]
    with pytest.raises(ConfigError, match="returned 1 scores for 2"):
        build_reward("fn:conftest:wrong_count_reward").score(["p", "p"], ["a", "b"])
    with pytest.raises(ConfigError, match="cannot import"):
        build_reward("fn:conftest:no_such_function")
    with pytest.raises(ConfigError, match="expected fn:package.module:function"):
        build_reward("fn:justaname")
    with pytest.raises(ConfigError, match="did you mean 'judge'"):
        build_reward("judgee:http://x")


@pytest.mark.parametrize("spec,problem", [
    ("fn:pty:spawn", "'pty' is part of Python's standard library"),
    ("fn:os:system", "'os' is part of Python's standard library"),
    ("fn:subprocess:run", "'subprocess' is part of Python's standard library"),
    ("fn:os.path:join", "'os' is part of Python's standard library"),
    ("fn:builtins:eval", "'builtins' is part of Python's standard library"),
    ("fn:yaml:dump", "'yaml' is an installed package"),
    ("fn:conftest:PairwiseJudge", "is not a plain Python function"),
    ("fn:conftest:build_model", "does not take (prompts, completions)"),
])
def test_fn_imports_only_the_user_s_own_functions(spec, problem, monkeypatch):
    """`fn:pty:spawn` ran a program named in the data (issue 36): the standard library is never a
    reward module, installed packages need $PREFTUNE_FN_MODULES, and the attribute must be a plain
    function of (prompts, completions)."""
    monkeypatch.delenv("PREFTUNE_FN_MODULES", raising=False)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        build_reward(spec)


def test_an_installed_package_is_allowed_when_listed(monkeypatch):
    monkeypatch.setenv("PREFTUNE_FN_MODULES", "yaml, other")
    with pytest.raises(ConfigError, match="is not a plain Python function"):  # past the allowlist: yaml.dump is one
        build_reward("fn:yaml:YAMLObject")
    assert build_reward("fn:conftest:length_reward").score(["p"], ["ab"]) == [2.0]


def test_ensemble_is_a_weighted_sum_less_the_disagreement_of_z_scores():
    spec = {"ensemble": [["fn:conftest:length_reward", 0.5], ["fn:conftest:constant_reward", 2.0]],
            "disagreement_penalty": 0.1}
    r = build_reward(spec)
    # lengths 4, 0 -> z-scores +1, -1; the constant member has no spread -> z 0, 0. Per completion
    # the population std of (1, 0) and of (-1, 0) is 0.5; weighted sums 0.5*4 + 2 = 4 and 0 + 2 = 2
    assert r.score(["p", "p"], ["abcd", ""]) == [pytest.approx(4.0 - 0.05), pytest.approx(2.0 - 0.05)]
    assert r.score(["p"], ["abcd"]) == [pytest.approx(4.0)]  # one completion: no spread to normalise by
    with pytest.raises(ConfigError, match="ensemble"):
        build_reward({"ensemble": []})


def test_members_on_different_scales_that_agree_on_the_order_do_not_disagree():
    r = build_reward({"ensemble": [["fn:conftest:length_reward", 1.0],
                                   ["fn:conftest:scaled_length_reward", 0.01]],
                      "disagreement_penalty": 10.0})
    completions = ["a", "abc", "abcdefg", ""]
    # raw spreads would be ~50 * length (a penalty of hundreds); z-scores are identical -> 0
    assert r.score(["p"] * 4, completions) == pytest.approx([1 + 1.05, 3 + 3.05, 7 + 7.05, 0.05], abs=1e-9)
    # the same member twice, one weighted 0: the weights do not enter the disagreement either
    r2 = build_reward({"ensemble": [["fn:conftest:length_reward", 1.0], ["fn:conftest:length_reward", 0.0]],
                       "disagreement_penalty": 1.0})
    assert r2.score(["p"] * 2, ["ab", "abcd"]) == [pytest.approx(2.0), pytest.approx(4.0)]
    # a failed member score makes that completion NaN; the others are z-scored without it
    nan = build_reward({"ensemble": [["fn:conftest:length_reward", 1.0],
                                     ["fn:conftest:half_failed_reward", 1.0]]})
    scores = nan.score(["p"] * 3, ["a", "ab", "abc"])
    assert scores[0] != scores[0] and scores[1:] == [pytest.approx(2 + 20), pytest.approx(3 + 30)]


def test_length_penalty_subtracts_alpha_per_word():
    r = build_reward("fn:conftest:constant_reward", length_penalty=0.25)
    assert r.score(["p", "p"], ["one two three four", "one"]) == [pytest.approx(0.0), pytest.approx(0.75)]


def test_reward_model_scores_with_logit_zero(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    r = build_reward(f"rm:{tmp_path / 'rm'}")
    prompts, completions = ["The movie was", "I hated"], [" great.", " the long ending."]
    scores = r.score(prompts, completions)
    with torch.no_grad():  # the RM reads (prompt, completion) through its own chat template, up to the
        # EOS that closes the assistant turn (the one rendering: what `preftune train-rm` trains on)
        chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                 for p, c in zip(prompts, completions)]
        texts = [tokenizer.apply_chat_template(m, tokenize=False).rstrip() for m in chats]
        assert all(t.endswith(tokenizer.eos_token) for t in texts)
        expect = [model(**tokenizer(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                  for t in texts]
    assert scores == pytest.approx(expect, abs=1e-5)  # padding in the batch changes nothing
    import json

    for f in (tmp_path / "rm").glob("chat_template*"):  # an RM without a template reads the plain text
        f.unlink()
    config = json.loads((tmp_path / "rm" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "rm" / "tokenizer_config.json").write_text(json.dumps(config))
    raw = build_reward(f"rm:{tmp_path / 'rm'}").score(prompts, completions)
    with torch.no_grad():
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] + tokenizer(c, add_special_tokens=False)["input_ids"]
               + [tokenizer.eos_token_id] for p, c in zip(prompts, completions)]  # apart, then EOS
        expect = [model(input_ids=torch.tensor([i])).logits[0, 0].item() for i in ids]
    assert raw == pytest.approx(expect, abs=1e-5)
    with pytest.raises(ConfigError, match="no reward model directory"):
        build_reward(f"rm:{tmp_path / 'missing'}")


def test_implicit_reward_of_a_trained_run_prefers_what_it_was_trained_to_prefer(tmp_path, tiny_model_dir):
    from preftune.config import load_config
    from preftune.training.train import train

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}",
                             f"run.output_dir={tmp_path / 'run'}", "train.lr=3e-2", "train.epochs=6",
                             "loss.beta=0.5", "model.lora_r=4", "diagnostics.probe_every=0"])
    train(cfg)
    r = build_reward(f"implicit:{tmp_path / 'run'}")
    prompts = [p["prompt"] for p in PAIRS[:4]]
    chosen = r.score(prompts, [p["chosen"] for p in PAIRS[:4]])
    rejected = r.score(prompts, [p["rejected"] for p in PAIRS[:4]])
    assert sum(c > j for c, j in zip(chosen, rejected)) >= 3
    with pytest.raises(ConfigError, match="not a finished preftune run"):
        build_reward(f"implicit:{tmp_path}")


def test_every_reward_kind_has_a_factory_and_the_help_names_them_all():
    """The kinds are one table (models/__init__.py REWARD_SYNTAX): the registry, the CLI's --reward
    help and the docs read it; a kind listed without a factory, or a factory nobody lists, fails."""
    from preftune.cli.args import _REWARDS
    from preftune.models import REWARD_SYNTAX
    from preftune.models.rewards import _FACTORIES, REWARD_KINDS

    assert list(REWARD_KINDS) == list(REWARD_SYNTAX) and set(_FACTORIES) == set(REWARD_SYNTAX)
    assert "arithmetic" in REWARD_KINDS and all(form in _REWARDS for form in REWARD_SYNTAX.values())
