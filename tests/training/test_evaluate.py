"""evaluate.py: held-out metrics computed independently of the code under test."""

import math

import pytest
import torch

from conftest import PAIRS, build_model, write_jsonl
from preftune.core.losses import LOSSES
from preftune.data import load_records, tokenize_records
from preftune.data.collate import collate_pairs
from preftune.models.loading import FrozenCopyReference
from preftune.training.evaluate import evaluate_pairs


def test_perplexity_and_accuracy_match_a_direct_computation(tmp_path, tokenizer):
    pairs, _ = tokenize_records(load_records(write_jsonl(tmp_path / "d.jsonl", PAIRS[:4])), tokenizer,
                                max_length=64, max_prompt_length=32)
    model = build_model(len(tokenizer), seed=1).eval()
    result = evaluate_pairs(model, FrozenCopyReference(build_model(len(tokenizer), seed=2).eval()),
                            LOSSES["sigmoid"], pairs, loss_kwargs={"beta": 0.1}, batch_size=3, pad_id=0)
    with torch.no_grad():
        batch = collate_pairs(pairs, pad_id=0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
        seq = (logp * batch["completion_mask"][:, 1:]).sum(1)
    chosen, rejected = seq[:4], seq[4:]
    tokens = sum(len(p.chosen_ids) for p in pairs)
    assert result["pairs"] == 4
    assert result["perplexity/chosen"] == pytest.approx(math.exp(-chosen.sum().item() / tokens), rel=1e-5)
    assert result["accuracy/logp"] == pytest.approx((chosen > rejected).float().mean().item())
    assert result["logps/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-4)


def test_win_rate_asks_a_pairwise_judge_when_there_is_one(tokenizer):
    from preftune.training.evaluate import sample_metrics

    class Judge:
        name = "stub"

        def __init__(self):
            self.asked = []

        def score(self, prompts, completions):
            return [float(len(c)) for c in completions]

        def compare(self, prompt, a, b):
            self.asked.append((a, b))
            return 1.0 if len(a) >= len(b) else 0.0

    model = build_model(len(tokenizer), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id).eval()
    judge = Judge()
    out = sample_metrics(model, FrozenCopyReference(model), tokenizer, [[5, 6, 7], [8, 9]], n=2, max_new_tokens=4,
                         seed=0, reward=judge)
    assert len(judge.asked) == 4 and out["win_rate/judge_comparisons"] == 4
    assert out["win_rate/judge"] == 1.0 and out["win_rate"] == 0.5  # same weights, same seed: equal samples
    assert out["win_rate/ci95"] == [0.5, 0.5] and out["win_rate/judge_ci95"] == [1.0, 1.0]  # over the 2 prompts
    assert [p["win"] for p in out["per_prompt"]] == [0.5, 0.5]


def test_evaluation_builds_no_autograd_graph(tmp_path, tokenizer):
    pairs, _ = tokenize_records(load_records(write_jsonl(tmp_path / "d.jsonl", PAIRS[:2])), tokenizer,
                                max_length=64, max_prompt_length=32)
    model = build_model(len(tokenizer), seed=1)
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    evaluate_pairs(model, FrozenCopyReference(build_model(len(tokenizer), seed=2).eval()), LOSSES["sigmoid"],
                   pairs, loss_kwargs={"beta": 0.1}, batch_size=2, pad_id=0)
    assert seen == [False]  # the policy forward; the reference forward is another module


def _pairs(tmp_path, tokenizer, n=7):
    rows = (PAIRS * 2)[:n]
    return tokenize_records(load_records(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer, max_length=64,
                            max_prompt_length=32, allow_degenerate=True)[0]


def test_before_training_is_one_forward_per_batch_and_accuracy_is_undefined_not_zero(tmp_path, tokenizer):
    from preftune.core.step import SameAsPolicy

    pairs = _pairs(tmp_path, tokenizer)
    model = build_model(len(tokenizer), seed=1).eval()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    result = evaluate_pairs(model, SameAsPolicy(), LOSSES["sigmoid"], pairs, loss_kwargs={"beta": 0.1}, batch_size=3,
                            pad_id=0)
    assert len(calls) == 3  # 7 pairs in batches of 3: one forward each, no reference forward
    assert result["accuracy/implicit_reward"] == 0.5 and result["accuracy/implicit_reward_undefined"] is True
    assert result["rewards/margins"] == 0.0
    same = evaluate_pairs(model, FrozenCopyReference(model), LOSSES["sigmoid"], pairs, loss_kwargs={"beta": 0.1},
                          batch_size=3, pad_id=0)  # the two-forward way gives the same numbers
    assert same["accuracy/logp"] == result["accuracy/logp"] and same["logps/chosen"] == pytest.approx(
        result["logps/chosen"], abs=1e-6) and len(calls) == 3 + 6


def test_packed_evaluation_equals_padded_and_intervals_are_wilson(tmp_path, tokenizer):
    from preftune.apps.eval import format_eval
    from preftune.core.stats import wilson
    from preftune.data.collate import collate_packed_pairs

    pairs = _pairs(tmp_path, tokenizer)
    model, ref = build_model(len(tokenizer), seed=1).eval(), build_model(len(tokenizer), seed=2).eval()
    args = dict(loss_kwargs={"beta": 0.1}, batch_size=3, pad_id=0)
    padded = evaluate_pairs(model, FrozenCopyReference(ref), LOSSES["sigmoid"], pairs, **args)
    packed = evaluate_pairs(model, FrozenCopyReference(ref), LOSSES["sigmoid"], pairs, **args,
                            collate=lambda chunk: collate_packed_pairs(chunk, prefix_sharing=True))
    for key in ("accuracy/implicit_reward", "accuracy/logp", "rewards/margins", "logps/chosen", "perplexity/chosen"):
        assert packed[key] == pytest.approx(padded[key], abs=1e-5), key
    lo, hi = wilson(8, 10)  # hand value: 0.8 of 10 -> [0.4902, 0.9433]
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert padded["accuracy/implicit_reward_ci95"] == wilson(padded["accuracy/implicit_reward"] * 7, 7)
    table = format_eval({**padded, "data": "d.jsonl", "run": "r"})
    assert "implicit-reward accuracy" in table and "[" in table and len(table.splitlines()) == 4


def test_progress_is_silent_when_short_and_reports_in_logs_when_long(capsys, monkeypatch):
    import preftune.utils.progress as pg

    assert list(pg.progress(range(5), total=5, desc="x")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""  # short: nothing in the log
    clock = iter(range(0, 1000, 6))  # 6 s per item: a line every second item (interval 10 s)
    monkeypatch.setattr(pg.time, "perf_counter", lambda: next(clock))
    assert len(list(pg.progress(range(5), total=10, desc="eval", unit="pairs", weights=[2] * 5))) == 5
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("eval: 4/10 pairs") and lines[-1].startswith("eval: 10/10 pairs")


def test_kl_estimate_reports_a_95_percent_interval(monkeypatch):
    """k1 = mean of log pi/pi_ref over samples: unbiased, so near 0 it can be negative; the
    interval (mean +- 1.96 standard errors) says how far to trust the sign."""
    import contextlib

    import torch

    import preftune.training.evaluate as ev

    class Ref:
        def context(self):
            return contextlib.nullcontext()

        def forward_model(self, model):
            return model

    policy = torch.tensor([0.5, -0.1, 0.2, 0.2])
    answers = iter([(policy, None), (torch.zeros(4), None)])  # the policy's logps, then the reference's
    monkeypatch.setattr(ev, "completion_logps", lambda model, batch: next(answers))
    monkeypatch.setattr(ev, "collate_sequences", lambda prompts, completions, pad: None)
    out = ev.kl_estimate(torch.nn.Linear(1, 1), Ref(), [([1], [2])] * 4, pad_id=0)
    se = policy.std().item() / 2
    assert out["kl"] == pytest.approx(0.2) and out["kl_stderr"] == pytest.approx(se)
    assert out["kl_ci95"] == pytest.approx([0.2 - 1.96 * se, 0.2 + 1.96 * se])


def test_per_pair_rows_are_the_aggregates_pair_by_pair(tmp_path, tokenizer):
    """The per-pair file's outcomes average to the reported accuracies, its log-prob margins are
    the direct computation's, each row carries the reference's own log-prob outcome (the run's
    "before"), and a base model (policy == reference) has no implicit-reward outcome at all."""
    from preftune.core.step import SameAsPolicy
    from preftune.training.evaluate import pair_key

    pairs = _pairs(tmp_path, tokenizer)
    model, ref = build_model(len(tokenizer), seed=1).eval(), build_model(len(tokenizer), seed=2).eval()
    rows = []
    result = evaluate_pairs(model, FrozenCopyReference(ref), LOSSES["sigmoid"], pairs, loss_kwargs={"beta": 0.1},
                            batch_size=3, pad_id=0, per_pair=rows)
    assert [r["line"] for r in rows] == [p.line for p in pairs]
    assert [r["pair"] for r in rows] == [pair_key(p) for p in pairs]
    assert sum(r["implicit_correct"] for r in rows) / 7 == pytest.approx(result["accuracy/implicit_reward"])
    assert sum(r["logp_correct"] for r in rows) / 7 == pytest.approx(result["accuracy/logp"])
    assert sum(r["implicit_margin"] for r in rows) / 7 == pytest.approx(result["rewards/margins"], abs=1e-6)
    with torch.no_grad():
        def margins(m):
            batch = collate_pairs(pairs, pad_id=0)
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
            seq = (logp * batch["completion_mask"][:, 1:]).sum(1)
            return (seq[:7] - seq[7:]).tolist()
    for r, mp, mr in zip(rows, margins(model), margins(ref)):
        assert r["logp_margin"] == pytest.approx(mp, abs=1e-4) and r["reference_logp_margin"] == pytest.approx(mr, abs=1e-4)
        assert r["reference_logp_correct"] == (1.0 if mr > 0 else 0.0)
        assert r["implicit_margin"] == pytest.approx(0.1 * (mp - mr), abs=1e-4)  # beta * (policy - reference)
    base = []
    evaluate_pairs(model, SameAsPolicy(), LOSSES["sigmoid"], pairs, loss_kwargs={"beta": 0.1}, batch_size=3, pad_id=0,
                   per_pair=base)
    assert all(r["implicit_correct"] is None and r["reference_logp_correct"] is None for r in base)
    assert [r["logp_correct"] for r in base] == [r["logp_correct"] for r in rows]
